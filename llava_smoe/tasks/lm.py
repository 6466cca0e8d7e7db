"""`lm`: language-model pretraining on local text with MoE (or dense) FFNs.

Recipe section `lm:` (see `LMTaskConfig`); `train/lm/tiny.yaml` is a CPU example. The final
model is written to `OUTPUT_DIR/final` (`save_language_model`), a transformers folder that
`load_language_model` loads and a VLM recipe takes as its language model
(`language_model: {name_or_path: OUTPUT_DIR/final}`), MoE layers included. `OUTPUT_DIR/data.json` records the corpus (tokens,
documents, skipped documents, cache folder) and the tokens per optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llava_smoe.config import Config, ConfigError, invalid
from llava_smoe.data.text import (
    Format,
    PackedSequences,
    ReadOptions,
    TextSplit,
    TokenCache,
    build_token_cache,
    collate,
    held_out_windows,
    resolve_files,
    spread_windows,
)
from llava_smoe.model.language_model import LMModelConfig, describe, save_language_model
from llava_smoe.training.distributed import barrier
from llava_smoe.training.tasks import TaskParts, count_supervised_tokens, register_task

log = logging.getLogger(__name__)

DATA_FILE = "data.json"


@dataclass
class LMTaskConfig(Config):
    """data: text files, directories or globs (.txt/.md, .jsonl, .parquet).
    eval_data: held-out files; without them `eval_fraction` of the sequences (at most
        `max_eval_sequences`, spread evenly over the token stream) is held out; 0 disables
        evaluation.
    tokenizer: a local transformers tokenizer folder, or null to train a byte-level BPE of
        `bpe_vocab_size` on the training documents.
    text_split: what a document is in plain-text files: a line, a blank-line separated
        paragraph, or the whole file.
    """

    data: list[str]
    model: LMModelConfig = field(default_factory=LMModelConfig)
    seq_len: int = 256
    format: Format = "auto"
    text_field: str = "text"
    text_split: TextSplit = "paragraph"
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05
    max_eval_sequences: int | None = 256
    tokenizer: str | None = None
    bpe_vocab_size: int = 512
    cache_dir: str = "~/.cache/llava_smoe/lm_tokens"

    def validate(self) -> None:
        if not self.data:
            raise invalid("data", "is empty: name text files, directories or glob patterns")
        if self.seq_len < 2:
            raise invalid("seq_len", f"must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise invalid("eval_fraction", f"must lie in [0, 1), got {self.eval_fraction}")
        if self.max_eval_sequences is not None and self.max_eval_sequences < 1:
            raise invalid("max_eval_sequences", f"must be >= 1 or null, got {self.max_eval_sequences}")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.format, self.text_field, self.text_split)


def prepare_data(config: LMTaskConfig) -> tuple[TokenCache, TokenCache | None]:
    """Tokenise (or reuse) the training and evaluation corpora; rank 0 first, the others then reuse."""
    root = Path(os.path.expanduser(config.cache_dir))
    options = config.read_options()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def build() -> tuple[TokenCache, TokenCache | None]:
        tokenizer = None
        if config.tokenizer is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(config.tokenizer))
        train = build_token_cache(resolve_files(config.data, "lm.data"), options, root, tokenizer=tokenizer,
                                  bpe_vocab_size=config.bpe_vocab_size)
        evaluation = None
        if config.eval_data:
            evaluation = build_token_cache(resolve_files(config.eval_data, "lm.eval_data"), options, root,
                                           tokenizer=tokenizer or train.load_tokenizer())
        return train, evaluation

    if rank == 0:
        caches = build()
        barrier()
    else:
        barrier()
        caches = build()
    return caches


def split_datasets(config: LMTaskConfig, train: TokenCache,
                   evaluation: TokenCache | None) -> tuple[PackedSequences, PackedSequences | None]:
    L = config.seq_len
    if evaluation is not None:
        eval_set = PackedSequences(evaluation.tokens, L)
        if config.max_eval_sequences is not None and len(eval_set) > config.max_eval_sequences:
            eval_set = PackedSequences(evaluation.tokens, L, spread_windows(len(eval_set), config.max_eval_sequences))
        return PackedSequences(train.tokens, L), eval_set
    total = train.meta["num_tokens"] // L
    n_eval = math.ceil(total * config.eval_fraction) if config.eval_fraction > 0 else 0
    if config.max_eval_sequences is not None:
        n_eval = min(n_eval, config.max_eval_sequences)
    if total - n_eval < 1:
        raise ConfigError(f"{train.meta['num_tokens']} tokens make {total} sequences of {L}; nothing is left for "
                          "training after the held-out part; lower lm.seq_len or add data")
    train_windows, eval_windows = held_out_windows(total, n_eval)
    train_set = PackedSequences(train.tokens, L, train_windows)
    return train_set, (PackedSequences(train.tokens, L, eval_windows) if n_eval else None)


@register_task("lm", LMTaskConfig)
def build_lm_task(config: LMTaskConfig, run) -> TaskParts:
    train_cache, eval_cache = prepare_data(config)
    tokenizer = train_cache.load_tokenizer()
    train_set, eval_set = split_datasets(config, train_cache, eval_cache)
    try:
        model = config.model.build(vocab_size=len(tokenizer), max_seq_len=config.seq_len,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    except ConfigError as exc:
        raise exc.within("model") from None
    except ValueError as exc:  # transformers' view of the architecture
        raise ConfigError(str(exc), ("model", "architecture")) from None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    t = run.train
    info: dict[str, Any] = {
        "seq_len": config.seq_len,
        "tokens_per_step": config.seq_len * t.micro_batch_size * t.grad_accum * world,
        "train_sequences": len(train_set),
        "eval_sequences": len(eval_set) if eval_set is not None else 0,
        "train_corpus": _corpus(train_cache),
        "eval_corpus": _corpus(eval_cache) if eval_cache is not None else None,
        "model": describe(model),
    }
    if world == 1 or dist.get_rank() == 0:
        log.info("lm: %s", info["model"])
        out = Path(t.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / DATA_FILE).write_text(json.dumps(info, indent=2))

    def export(model, out_dir: Path) -> None:
        save_language_model(model, out_dir, tokenizer)

    return TaskParts(model=model, train_dataset=train_set, eval_dataset=eval_set, collate_fn=collate,
                     export_fn=export, count_loss_items=count_supervised_tokens)


def _corpus(cache: TokenCache) -> dict[str, Any]:
    m = cache.meta
    return {"cache": str(cache.path), "reused": cache.reused, "tokens": m["num_tokens"],
            "documents": m["documents"], "skipped": m["skipped"], "files": m["files"]}
