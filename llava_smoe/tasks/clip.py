"""`clip`: contrastive image-text pretraining of a vision tower on captions (CLIP's loss).

Where no pretrained encoder fits (a new image domain, or the tiny from-config tower of the
embedded default), this stage gives the tower features that tell images apart by everything
their captions say before a projector learns to feed them to the LM. Trained through the LM
alone, a from-scratch tower keeps only what the LM reads first (in the shapes world: colour,
~90% of the feature variance) and the LM never learns to read the rest (shape); contrasting
captions that differ in a single shape forces the tower to encode it.

The model is transformers' `CLIPModel` built from `model:` (a `CLIPConfig` dict; the text
vocabulary is sized from the tokenizer). `OUTPUT_DIR/final` is a standard CLIP checkpoint (with
`preprocessor_config.json` and the tokenizer): a VLM stage loads its vision half with
`vision: {backend: hf, name_or_path: OUTPUT_DIR/final}`.

Records are LLaVA JSON/JSONL; a record's caption is its first assistant turn, and records
without an image are bad samples (`on_bad_sample`). The loss contrasts the samples of one
micro-batch on one process (features are not gathered across processes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from llava_smoe.config import Config, ConfigError, invalid
from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
from llava_smoe.data.records import BadSampleError, BadSamplePolicy
from llava_smoe.model.vision import (  # a new tower can use its family's constants
    CLIP_MEAN,
    CLIP_STD,
)
from llava_smoe.training.tasks import TaskParts, register_task


@dataclass
class ClipTaskConfig(Config):
    """data / eval_data: LLaVA JSON or JSONL (data may list several); the caption is the first
        assistant turn; image paths are relative to image_folder.
    tokenizer: tokenizer folder for the captions.
    model: a transformers `CLIPConfig` dict ({text_config, vision_config, projection_dim, ...});
        text_config.vocab_size / eos / pad ids are set from the tokenizer.
    max_length: longest caption in tokens (end token included).
    cache_samples: keep built samples in memory after their first use (data that fits in RAM).
    """

    data: str | list[str]
    tokenizer: str
    model: dict[str, Any] = field(default_factory=dict)
    image_folder: str | None = None
    eval_data: str | None = None
    max_length: int = 77
    on_bad_sample: BadSamplePolicy = "error"
    cache_samples: bool = False

    def validate(self) -> None:
        if "vision_config" not in self.model or "text_config" not in self.model:
            raise invalid("model", "needs text_config and vision_config (a transformers CLIPConfig dict)")
        if self.max_length < 2:
            raise invalid("max_length", f"must be >= 2, got {self.max_length}")


class CaptionDataset(LlavaDataset):
    """(caption tokens + end token, image) pairs from LLaVA records, with LlavaDataset's checks
    and bad-sample policy; a record without an image is a bad sample ("no_image")."""

    def __init__(self, config: DataConfig, processor, end_token_id: int):
        self.end_token_id = end_token_id
        super().__init__(config, processor)

    def _check(self, record_index: int):
        info = super()._check(record_index)
        if not info.has_image:
            raise BadSampleError("no_image", "contrastive pretraining needs an image in every record",
                                 source=self.config.data_path, index=record_index, record_id=info.record_id)
        return info

    def _build(self, i: int) -> dict[str, Any]:
        caption = next(m.content for m in self._messages(self.record_index(i)) if m.role == "assistant")
        ids = self.processor.tokenizer(caption, add_special_tokens=False)["input_ids"] + [self.end_token_id]
        if len(ids) > self.config.max_length:
            raise self._bad(i, "too_long", f"caption is {len(ids)} tokens, longer than max_length="
                                           f"{self.config.max_length}")
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "image": self._image(i)}


def build_clip_model(spec: dict[str, Any], tokenizer) -> torch.nn.Module:
    """CLIPModel from a CLIPConfig dict, its text vocabulary sized to `tokenizer` plus an end token."""
    from transformers import CLIPConfig, CLIPModel

    spec = json.loads(json.dumps(spec))  # a private copy
    # The end token gets its own id, the largest: CLIP pools the text at the end token, found
    # either by id or (legacy configs, eos_token_id == 2) as the argmax of the ids.
    end_id = len(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    spec["text_config"].update(vocab_size=end_id + 1, eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=bos)
    return CLIPModel(CLIPConfig(**spec))


@register_task("clip", ClipTaskConfig)
def build_clip(config: ClipTaskConfig, run) -> TaskParts:
    from transformers import AutoTokenizer

    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
    )

    if not Path(config.tokenizer).is_dir():
        raise ConfigError(f"{config.tokenizer} is not a folder", ("tokenizer",))
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{config.tokenizer} has no pad token", ("tokenizer",))
    image_size = config.model["vision_config"].get("image_size", 224)
    # The processor supplies the image pipeline and LlavaDataset's record checks (it adds the
    # image token to the tokenizer first, so the text tower's vocabulary includes it).
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template="plain", num_image_tokens=1,
        image=ImageProcessingConfig(image_size=image_size, mean=CLIP_MEAN, std=CLIP_STD)))
    model = build_clip_model(config.model, processor.tokenizer)
    text = model.config.text_config
    if config.max_length > text.max_position_embeddings:
        raise ConfigError(f"{config.max_length} exceeds model.text_config.max_position_embeddings="
                          f"{text.max_position_embeddings}", ("max_length",))

    def dataset(path: str) -> CaptionDataset:
        return CaptionDataset(DataConfig(path, config.image_folder, config.max_length, config.on_bad_sample,
                                         cache=config.cache_samples),
                              processor, text.eos_token_id)

    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    parts = [dataset(p) for p in paths]

    def export_fn(m: torch.nn.Module, out_dir: Path) -> None:
        from transformers import CLIPImageProcessor

        m.save_pretrained(out_dir)
        processor.tokenizer.save_pretrained(out_dir)
        CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)

    return TaskParts(
        model=model,
        train_dataset=parts[0] if len(parts) == 1 else ConcatDataset(parts),
        eval_dataset=dataset(config.eval_data) if config.eval_data else None,
        collate_fn=DataCollator(processor.pad_token_id, model_kwargs={"return_loss": True}),
        export_fn=export_fn,
    )
