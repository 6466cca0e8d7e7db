"""`facts`: how many facts a language model stores in a given number of steps, a capacity probe.

A table drawn from the run's seed gives every key, a (property, colour, shape) triple as the
shapes world's lookup questions ask it, one of `values` values. A sample is one key's four tokens
(property, colour, shape, value) with the loss on the value alone; an epoch shows every fact
once, so `train.max_steps x micro_batch_size / facts` is how often each fact is seen. Evaluation
scores every fact by the most likely value (`eval/accuracy`, the fraction recalled) and takes the
value's loss (`eval/loss`). There is nothing else to learn: what the FFN width, the experts or the
router change is how much of the table a run recalls at a budget, which says whether capacity is
what a model of that size is short of at that budget (train/study/facts-capacity.yaml).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from llava_smoe.config import Config, invalid
from llava_smoe.model.language_model import LMModelConfig, describe
from llava_smoe.training.tasks import (
    IGNORE_INDEX,
    TaskParts,
    count_supervised_tokens,
    register_task,
)

log = logging.getLogger(__name__)

EVAL_CHUNK = 4096  # facts per forward pass when scoring the table


@dataclass
class FactsTaskConfig(Config):
    """properties x colours x shapes facts, each one of `values` values; `model` is the LM
    trained from scratch (`lm.model`'s schema: architecture, moe, moe_layers)."""

    properties: int = 50
    colors: int = 4
    shapes: int = 3
    values: int = 8
    model: LMModelConfig = field(default_factory=LMModelConfig)

    def validate(self) -> None:
        for name in ("properties", "colors", "shapes"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be >= 1, got {getattr(self, name)}")
        if self.values < 2:
            raise invalid("values", f"must be >= 2 (one value is nothing to recall), got {self.values}")

    @property
    def num_facts(self) -> int:
        return self.properties * self.colors * self.shapes

    @property
    def first_value(self) -> int:  # token ids: properties, then colours, shapes and values
        return self.properties + self.colors + self.shapes

    @property
    def vocab_size(self) -> int:
        return self.first_value + self.values


class FactTable(Dataset):
    """Every fact once, as [property, colour, shape, value] token ids (fact i: key i, row-major)."""

    def __init__(self, config: FactsTaskConfig, seed: int):
        p, c, s = config.properties, config.colors, config.shapes
        index = torch.arange(config.num_facts)
        generator = torch.Generator().manual_seed(seed)
        self.values = torch.randint(config.values, (config.num_facts,), generator=generator)
        self.tokens = torch.stack([index // (c * s), p + index // s % c, p + c + index % s,
                                   config.first_value + self.values], dim=1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(rows)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = input_ids[:, -1]  # the value: the key's three tokens are given, not predicted
    return {"input_ids": input_ids, "labels": labels}


@register_task("facts", FactsTaskConfig)
def build_facts_task(config: FactsTaskConfig, run) -> TaskParts:
    table = FactTable(config, run.train.seed)  # the seed's table: the same for every variant of a seed
    model = config.model.build(vocab_size=config.vocab_size, max_seq_len=4)

    @torch.no_grad()
    def recall(model) -> dict[str, float]:
        correct = 0
        for start in range(0, len(table), EVAL_CHUNK):
            rows = table.tokens[start:start + EVAL_CHUNK]
            logits = model(input_ids=rows[:, :3]).logits[:, -1, config.first_value:]
            correct += int((logits.argmax(-1) == table.values[start:start + EVAL_CHUNK]).sum())
        return {"eval/accuracy": correct / len(table)}

    log.info("facts: %d facts of %d values; %s", config.num_facts, config.values, describe(model))
    return TaskParts(model=model, train_dataset=table, eval_dataset=table, collate_fn=collate,
                     count_loss_items=count_supervised_tokens, evaluate_fn=recall)
