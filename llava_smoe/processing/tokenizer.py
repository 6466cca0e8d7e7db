"""Small byte-level BPE tokenizers trained locally, and special-token bookkeeping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from llava_smoe.processing.templates import BUILTIN_TEMPLATES

DEFAULT_IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# ChatML as a Jinja template, so a locally trained tokenizer also exercises the
# "tokenizer's own chat template" path.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def template_control_tokens() -> list[str]:
    """Every control token the built-in chat templates use."""
    tokens: list[str] = []
    for template in BUILTIN_TEMPLATES.values():
        tokens.extend(t for t in template.control_tokens if t not in tokens)
    return tokens


def template_text() -> list[str]:
    """The fixed text the built-in chat templates write around turns ("user\n", "assistant\n",
    " USER: " ...), without contents and control tokens."""
    pieces: list[str] = []
    for template in BUILTIN_TEMPLATES.values():
        for fmt in (template.system_format, template.user_format, template.assistant_header):
            text = fmt.replace("{system}", "").replace("{content}", "")
            for token in template.control_tokens:
                text = text.replace(token, "")
            if text.strip() and text not in pieces:
                pieces.append(text)
    return pieces


def _with_template_text(texts: Iterable[str]) -> Iterator[str]:
    # Weighted as if each text were one chat turn: a tokenizer trained without them spends 3 tokens
    # on "user" and 8 on "assistant" (a third of a short Q&A record), a real one 1 each.
    count = 0
    for text in texts:
        count += 1
        yield text
    pieces = template_text()
    for _ in range(count):
        yield from pieces


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    extra_special_tokens: Iterable[str] = (),
    chat_template: str | None = CHATML_JINJA,
    min_frequency: int = 2,
    with_template_text: bool = True,
) -> Any:
    """Train a byte-level BPE on `texts` (and, unless `with_template_text` is false, the chat
    templates' role words, as many times as there are texts) and wrap it as a transformers fast
    tokenizer.

    Special tokens: `<pad>` (0), `<s>` (1), `</s>` (2), the image token, the built-in templates'
    control tokens and `extra_special_tokens`. The result round-trips through
    `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extras = [image_token, *template_control_tokens()]
    extras += [t for t in extra_special_tokens if t not in extras]
    specials = [PAD, BOS, EOS, *extras]
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
            f"{len(specials)} special tokens; use at least {256 + len(specials) + 1}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_with_template_text(texts) if with_template_text else texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=extras,
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def ensure_special_tokens(tokenizer: Any, tokens: Iterable[str]) -> list[str]:
    """Add each token the tokenizer does not already know as a single special token; return
    those added (the model's embedding table must grow by that many rows)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    for t in tokens:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"token {t!r} should encode to one id but encodes to {ids}")
    return missing
