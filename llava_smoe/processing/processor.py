"""`LlavaSmoeProcessor`: the one place prompts, labels and image tensors are built.

Training, evaluation and serving all go through it, and it is saved next to the weights
(tokenizer files + `processor_config.json`), so the template, image token and preprocessing
used at serving time are the ones used in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from llava_smoe.config import Config, ConfigError, dump, invalid, parse
from llava_smoe.processing.images import ImageProcessingConfig, preprocess_image
from llava_smoe.processing.templates import (
    IMAGE_POSITIONS,
    TEMPLATE_NAMES,
    ConversationError,
    Message,
    Segment,
    check_turn_order,
    get_template,
    normalize_messages,
    with_placeholders,
)
from llava_smoe.processing.tokenizer import DEFAULT_IMAGE_TOKEN, ensure_special_tokens

IGNORE_INDEX = -100
PROCESSOR_CONFIG_NAME = "processor_config.json"
FORMAT_VERSION = 1


@dataclass
class ProcessorConfig(Config):
    """Everything besides the tokenizer that decides what the model sees.

    `num_image_tokens` is the number of projected vision features per image (e.g. 576 for
    CLIP ViT-L/14 at 336 px); each image placeholder expands to that many image-token ids.
    `system_prompt` replaces the template's default system prompt. `end_of_turn` only applies
    to template 'tokenizer' (default: the tokenizer's EOS token).
    """

    template: str = "vicuna_v1"
    num_image_tokens: int = 576
    image_token: str = DEFAULT_IMAGE_TOKEN
    system_prompt: str | None = None
    end_of_turn: str | None = None
    # Where a message's images go when its text does not place them: "first" (before the text,
    # as LLaVA's data has them) or "last" (after it: a question's answer then sits a fixed few
    # tokens after the image, whatever the question's length).
    image_position: str = "first"
    image: ImageProcessingConfig = field(default_factory=ImageProcessingConfig)

    def validate(self) -> None:
        if self.template not in TEMPLATE_NAMES:
            raise invalid("template", f"unknown template {self.template!r}; choose one of {list(TEMPLATE_NAMES)}")
        if self.num_image_tokens <= 0:
            raise invalid("num_image_tokens", "must be a positive int (the vision tower's feature count per image), "
                                              f"got {self.num_image_tokens!r}")
        if not self.image_token or any(c.isspace() for c in self.image_token):
            raise invalid("image_token", f"must be a non-empty string without whitespace, got {self.image_token!r}")
        if self.image_position not in IMAGE_POSITIONS:
            raise invalid("image_position", f"must be one of {list(IMAGE_POSITIONS)}, got {self.image_position!r}")
        if self.template == "plain" and self.system_prompt:
            raise invalid("system_prompt", "template 'plain' takes no system prompt; set system_prompt to null")
        if self.end_of_turn is not None and self.template != "tokenizer":
            raise invalid("end_of_turn", "only applies to template 'tokenizer'; named templates define their own")


class LlavaSmoeProcessor:
    """Tokenizer + chat template + image token + image preprocessing.

    Constructing it registers the image token and the template's control tokens as special
    tokens when the tokenizer lacks them; `added_tokens` lists those (the language model's
    embedding table must be resized to `len(processor.tokenizer)`).
    """

    def __init__(self, tokenizer: Any, config: ProcessorConfig | None = None):
        self.config = config or ProcessorConfig()
        self.tokenizer = tokenizer
        self.template = get_template(self.config.template, tokenizer, self.config.end_of_turn)
        self.added_tokens = ensure_special_tokens(
            tokenizer, [self.config.image_token, *self.template.control_tokens]
        )
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(self.config.image_token)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building the processor")
        end = self.template.end_of_turn(tokenizer.eos_token)
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if end:
            end_ids = tokenizer.encode(end, add_special_tokens=False)
            if len(end_ids) != 1:
                raise ValueError(
                    f"end-of-turn marker {end!r} of template {self.template.name!r} encodes to {len(end_ids)} "
                    "ids; it must be a single (special) token so generation can stop on it"
                )
            stop = list(dict.fromkeys([*end_ids, *stop]))
        self.stop_token_ids: list[int] = stop

    # ---- properties -------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        return self.config.image_token

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_config(self) -> ImageProcessingConfig:
        return self.config.image

    # ---- text -------------------------------------------------------------------------------
    def _messages(self, conversation: Sequence[Any]) -> list[Message]:
        return self._with_system(normalize_messages(conversation))

    def _with_system(self, messages: Sequence[Message]) -> list[Message]:
        if self.config.system_prompt is not None and not (messages and messages[0].role == "system"):
            return [Message("system", self.config.system_prompt), *messages]
        return list(messages)

    def render_segments(self, conversation: Sequence[Any], *, add_generation_prompt: bool = False) -> list[Segment]:
        """The prompt as text segments flagged supervised / masked (useful for inspection)."""
        return self.template.render_segments(
            self._messages(conversation),
            add_generation_prompt=add_generation_prompt,
            bos=self.tokenizer.bos_token,
            eos=self.tokenizer.eos_token,
        )

    def _tokenize(self, segments: list[Segment], num_images: int) -> tuple[list[int], list[int]]:
        placeholder = self.config.image_token
        found = sum(s.text.count(placeholder) for s in segments)
        if found != num_images:
            raise ConversationError(
                f"the conversation has {found} {placeholder!r} placeholder(s) but {num_images} image(s) were given"
            )
        # Split each segment at the placeholders; tokenise all text pieces in one batched call.
        pieces: list[tuple[int, str | None]] = []
        for k, segment in enumerate(segments):
            if segment.supervised and placeholder in segment.text:
                raise ConversationError(f"an assistant turn contains the image placeholder {placeholder!r}")
            for j, part in enumerate(segment.text.split(placeholder)):
                if j:
                    pieces.append((k, None))
                if part:
                    pieces.append((k, part))
        texts = [p for _, p in pieces if p is not None]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        input_ids: list[int] = []
        labels: list[int] = []
        for k, part in pieces:
            ids = [self.image_token_id] * self.num_image_tokens if part is None else next(encoded)
            input_ids.extend(ids)
            labels.extend(ids if segments[k].supervised else [IGNORE_INDEX] * len(ids))
        return input_ids, labels

    def encode_conversation(self, conversations: Sequence[Any], has_image: bool | int = False) -> dict[str, torch.Tensor]:
        """A training sample: `input_ids` and `labels` (IGNORE_INDEX except on assistant text and
        its end-of-turn marker). `has_image` may also be an image count."""
        messages = normalize_messages(conversations)
        check_turn_order(messages)
        return self.encode_messages(messages, int(has_image))

    def encode_messages(self, messages: Sequence[Message], num_images: int) -> dict[str, torch.Tensor]:
        """`encode_conversation` for messages already checked (a dataset validates records once)."""
        messages = self._with_system(messages)
        segments = self.template.render_segments(
            messages, add_generation_prompt=False, bos=self.tokenizer.bos_token, eos=self.tokenizer.eos_token
        )
        input_ids, labels = self._tokenize(segments, num_images)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}

    def place_images(self, messages: Sequence[Any], has_image: bool | int | Sequence[int]) -> list[Message]:
        """The messages with their image placeholders: the one place they are inserted.

        has_image: the number of images of each message, whose placeholders go at the start of
        that message's text, or at its end with `image_position: last` (the text must not contain
        the placeholder itself; only user messages may carry images); or whether / how many
        images the conversation has: when no text places them, their placeholders all go into
        the first user turn, the same way."""
        placeholder = self.config.image_token
        msgs = normalize_messages(messages)
        if not isinstance(has_image, Sequence):
            num_images = int(has_image)
            if not num_images or any(placeholder in m.content for m in msgs):
                return msgs
            first_user = next((i for i, m in enumerate(msgs) if m.role == "user"), 0)
            has_image = [num_images if i == first_user else 0 for i in range(len(msgs))]
        elif len(has_image) != len(msgs):
            raise ValueError(f"has_image gives image counts for {len(has_image)} messages, the conversation "
                             f"has {len(msgs)}")
        else:
            for i, (m, n) in enumerate(zip(msgs, has_image)):
                if placeholder in m.content:
                    raise ConversationError(f"message {i} contains the reserved image token {placeholder!r}; "
                                            "attach images instead")
                if n and m.role != "user":
                    raise ConversationError(f"message {i} ({m.role}) has images; only user messages may carry images")
        position = self.config.image_position
        return [Message(m.role, with_placeholders(m.content, placeholder, n, position)) for m, n in zip(msgs, has_image)]

    def build_generation_prompt(
        self, messages: Sequence[Any], has_image: bool | int | Sequence[int] = False, *,
        insert_image_placeholder: bool = True,
    ) -> torch.Tensor:
        """Token ids of the conversation so far plus the assistant header, ready for generation.

        Placeholders are placed by `place_images` (insert_image_placeholder=False: the text holds
        them already)."""
        if insert_image_placeholder or isinstance(has_image, Sequence):
            msgs = self.place_images(messages, has_image)
        else:
            msgs = normalize_messages(messages)
        num_images = sum(has_image) if isinstance(has_image, Sequence) else int(has_image)
        msgs = self._with_system(msgs)
        check_turn_order(msgs, for_generation=True)
        segments = self.template.render_segments(
            msgs, add_generation_prompt=True, bos=self.tokenizer.bos_token, eos=self.tokenizer.eos_token
        )
        input_ids, _ = self._tokenize(segments, num_images)
        return torch.tensor(input_ids, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- images -----------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> float tensor [N, 3, S, S]."""
        size = self.config.image.image_size
        if not images:
            return torch.zeros(0, 3, size, size)
        return torch.stack([preprocess_image(im, self.config.image) for im in images])

    # ---- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **dump(self.config)}, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LlavaSmoeProcessor":
        """Load from a local folder written by `save_pretrained` (no remote code, no pickles)."""
        from transformers import AutoTokenizer

        path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {directory} was not written by LlavaSmoeProcessor.save_pretrained")
        with open(path) as f:
            data = json.load(f)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"format_version {version} is not supported (expected {FORMAT_VERSION})", (path,))
        config = parse(ProcessorConfig, data, (path,))
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        return cls(tokenizer, config)
