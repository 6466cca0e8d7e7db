"""Shared pieces of the `lm` tests: a small learnable corpus and a tiny recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SIDES = {"circle": "zero", "square": "four", "triangle": "three"}


def write_corpus(path: Path, lines: int = 600, seed: int = 0) -> Path:
    """Templated sentences: predictable enough that a tiny model's loss falls in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        c, s = rng.choice(COLORS), rng.choice(SHAPES)
        out.append(rng.choice([
            f"There is a {c} {s} on the left.",
            f"What color is the {s}? {c}",
            f"How many sides does a {s} have? {SIDES[s]}",
        ]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def lm_recipe(tmp_path: Path, corpus: Path, *, router: str | None = "smoe", **train) -> dict:
    moe = None if router is None else {"num_experts": 4, "top_k": 2, "router": router}
    return {
        "task": "lm",
        "lm": {
            "data": [str(corpus)],
            "text_split": "line",
            "seq_len": 32,
            "eval_fraction": 0.1,
            "max_eval_sequences": 16,
            "bpe_vocab_size": 300,
            "cache_dir": str(tmp_path / "cache"),
            "model": {
                "architecture": {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 8, "tie_word_embeddings": True},
                "moe": moe,
                "moe_layers": "all",
            },
        },
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "micro_batch_size": 4, "precision": "fp32",
                  "log_every": 1, "tensorboard": False, "progress_bar": False, **train},
        "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 3.0e-3}], "warmup_ratio": 0.1},
    }


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
