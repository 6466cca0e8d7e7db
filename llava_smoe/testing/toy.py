"""`toy`: a tiny causal LM with MoE FFNs on synthetic sequences, for tests and smoke runs.

Each sequence is an arithmetic progression modulo the vocabulary, `x_t = (a + b t) mod V`,
so the next token is predictable from the previous two and the loss falls within a few steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from llava_smoe.config import Config, dump, invalid
from llava_smoe.moe import MoEConfig, MoELayer
from llava_smoe.training.tasks import (
    IGNORE_INDEX,
    TaskParts,
    count_supervised_tokens,
    register_task,
)


@dataclass
class ToyTaskConfig(Config):
    vocab_size: int = 16
    seq_len: int = 16
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.1
    moe: MoEConfig | None = field(default_factory=lambda: MoEConfig(num_experts=4, top_k=2, router="smoe"))
    num_train: int = 256
    num_eval: int = 32
    data_seed: int = 1234
    # Sequence lengths drawn in [min_seq_len, seq_len] (padding is not supervised); seq_len when null.
    min_seq_len: int | None = None

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise invalid("hidden_size", f"{self.hidden_size} must be divisible by num_heads={self.num_heads}")
        for name in ("vocab_size", "seq_len", "num_layers", "num_train"):
            if getattr(self, name) < 2:
                raise invalid(name, f"must be >= 2, got {getattr(self, name)}")
        if self.min_seq_len is not None and not 2 <= self.min_seq_len <= self.seq_len:
            raise invalid("min_seq_len", f"must lie in [2, seq_len={self.seq_len}], got {self.min_seq_len}")


@dataclass
class ToyOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class ProgressionDataset(Dataset):
    def __init__(self, num: int, seq_len: int, vocab_size: int, seed: int, min_seq_len: int | None = None):
        g = torch.Generator().manual_seed(seed)
        a_N = torch.randint(0, vocab_size, (num, 1), generator=g)
        b_N = torch.randint(1, vocab_size, (num, 1), generator=g)
        t_S = torch.arange(seq_len)
        self.tokens_NS = (a_N + b_N * t_S) % vocab_size
        low = seq_len if min_seq_len is None else min_seq_len
        self.lengths_N = torch.randint(low, seq_len + 1, (num,), generator=g)

    def __len__(self) -> int:
        return self.tokens_NS.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens_NS[i, : self.lengths_N[i]]


def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded with token 0; padding is not supervised (and, attention being causal, never
    seen by a real token)."""
    longest = max(len(x) for x in items)
    input_ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for b, x in enumerate(items):
        input_ids[b, : len(x)] = x
        labels[b, : len(x)] = x
    return {"input_ids": input_ids, "labels": labels}


class Block(nn.Module):
    def __init__(self, config: ToyTaskConfig, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_heads
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        if config.moe is None:
            self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        else:
            self.ffn = MoELayer(config.moe, D, 2 * D, layer_idx=layer_idx)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.ln1(x_BSD)).view(B, S, 3, self.num_heads, D // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BSD = x_BSD + self.drop(self.proj(attn.transpose(1, 2).reshape(B, S, D)))
        return x_BSD + self.drop(self.ffn(self.ln2(x_BSD)))


class ToyLM(nn.Module):
    def __init__(self, config: ToyTaskConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        # A module, not a bare root parameter: ZeRO-3 gathers parameters per module call.
        self.pos = nn.Embedding(config.seq_len, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, like most LMs (exercises shared-tensor saving)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self._checkpoint_kwargs: dict | None = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self._checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                num_items_in_batch: int | float | torch.Tensor | None = None) -> ToyOutput:
        """`.loss`: the mean over supervised tokens, or their sum / num_items_in_batch."""
        x_BSD = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            if self._checkpoint_kwargs is not None and self.training:
                x_BSD = checkpoint(block, x_BSD, **self._checkpoint_kwargs)
            else:
                x_BSD = block(x_BSD)
        logits_BSV = self.head(self.norm(x_BSD))
        loss = None
        if labels is not None:
            logits, targets = logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
            if num_items_in_batch is None:
                loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
            else:
                loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
        return ToyOutput(loss, logits_BSV)


def export(model: nn.Module, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dump(model.config), indent=2))
    save_model(model, str(out_dir / "model.safetensors"))


@register_task("toy", ToyTaskConfig)
def build_toy(config: ToyTaskConfig, run) -> TaskParts:
    def make(n: int, seed: int) -> ProgressionDataset:
        return ProgressionDataset(n, config.seq_len, config.vocab_size, seed, config.min_seq_len)

    return TaskParts(
        model=ToyLM(config),
        train_dataset=make(config.num_train, config.data_seed),
        eval_dataset=make(config.num_eval, config.data_seed + 1) if config.num_eval else None,
        collate_fn=collate,
        export_fn=export,
        count_loss_items=count_supervised_tokens,
    )
