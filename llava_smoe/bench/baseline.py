"""The anchor a tiny VLM should beat: a small CNN + question-encoder classifier on the same data.

A 4-block CNN reads the image (its last feature map is flattened, so where things are survives);
a GRU reads the question (words as tokens); an MLP over both picks one of the training set's
answers. Trained with Adam until validation accuracy stops improving (early stopping), then
scored by exact match on the test questions, per question type, with the image and with a blank
one (the pipeline's "blind"). It answers single-word questions only: a classifier, not a model
of language, which is what makes it a fair floor for data like the shapes world's.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe.config import Config, invalid


@dataclass
class BaselineConfig(Config):
    train: str
    test: str
    image_folder: str
    val: str | None = None  # default: the last 10% of train
    image_size: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    max_epochs: int = 40
    patience: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.image_size % 16:
            raise invalid("image_size", f"must be a multiple of 16, got {self.image_size}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _qa(path: str) -> list[tuple[str, str, str, str]]:
    """(image, question, answer, type) of every first turn of every record with an image."""
    out = []
    for r in json.loads(Path(path).read_text()):
        if not r.get("image"):
            continue
        turns = r["conversations"]
        kind = ((r.get("meta") or {}).get("types") or ["all"])[0]
        out.append((r["image"], turns[0]["value"].replace("<image>", "").strip(), turns[1]["value"].strip(), kind))
    return out


class CNNQA(nn.Module):
    def __init__(self, vocab: int, answers: int, image_size: int, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for k in range(4):  # each block halves the side: image_size / 16 cells remain
            layers += [nn.Conv2d(c, width * 2 ** min(k, 2), 3, padding=1), nn.BatchNorm2d(width * 2 ** min(k, 2)),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c = width * 2 ** min(k, 2)
        self.cnn = nn.Sequential(*layers)
        cells = (image_size // 16) ** 2
        self.image_proj = nn.Linear(c * cells, 256)
        self.embed = nn.Embedding(vocab, 64, padding_idx=0)
        self.gru = nn.GRU(64, 128, batch_first=True)
        self.head = nn.Sequential(nn.Linear(256 + 128, 256), nn.ReLU(), nn.Linear(256, answers))

    def forward(self, pixels_BCHW: torch.Tensor, words_BL: torch.Tensor) -> torch.Tensor:
        image_B = self.image_proj(self.cnn(pixels_BCHW).flatten(1)).relu()
        _, h_1BH = self.gru(self.embed(words_BL))
        return self.head(torch.cat([image_B, h_1BH[0]], dim=-1))


def run_baseline(config: BaselineConfig) -> dict[str, Any]:
    from PIL import Image

    torch.manual_seed(config.seed)
    train, test = _qa(config.train), _qa(config.test)
    if config.val:
        val = _qa(config.val)
    else:
        cut = max(1, len(train) // 10)
        train, val = train[:-cut], train[-cut:]
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for _, q, _, _ in train for w in _words(q)}))}
    answers = sorted({a for _, _, a, _ in train})
    answer_id = {a: i for i, a in enumerate(answers)}
    cache: dict[str, torch.Tensor] = {}

    def pixels(image: str) -> torch.Tensor:
        if image not in cache:
            with Image.open(Path(config.image_folder) / image) as im:
                im = im.convert("RGB").resize((config.image_size, config.image_size), Image.Resampling.BICUBIC)
                cache[image] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(
                    config.image_size, config.image_size, 3).permute(2, 0, 1).float().div(255) - 0.5
        return cache[image]

    def tensors(items, blank: bool = False):
        words = [[vocab.get(w, 0) for w in _words(q)] or [0] for _, q, _, _ in items]
        width = max(len(w) for w in words)
        words_BL = torch.zeros(len(items), width, dtype=torch.long)
        for b, w in enumerate(words):
            words_BL[b, width - len(w):] = torch.tensor(w)  # left padding: the GRU ends on the last word
        px = torch.stack([pixels(i) for i, _, _, _ in items])
        if blank:
            px = torch.full_like(px, px.mean().item())
        targets = torch.tensor([answer_id.get(a, -1) for _, _, a, _ in items])
        return px, words_BL, targets

    model = CNNQA(len(vocab) + 1, len(answers), config.image_size)
    optim = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    @torch.no_grad()
    def predict(items, blank=False) -> list[int]:
        model.eval()
        out = []
        for start in range(0, len(items), 256):
            px, w, _ = tensors(items[start:start + 256], blank)
            out += model(px, w).argmax(-1).tolist()
        model.train()
        return out

    def accuracy(items, blank=False) -> float:
        preds = predict(items, blank)
        return sum(answers[p] == a for p, (_, _, a, _) in zip(preds, items)) / len(items)

    best, best_state, since, epochs, t0 = -1.0, None, 0, 0, time.perf_counter()
    for epoch in range(config.max_epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            px, w, y = tensors([train[i] for i in order[start:start + config.batch_size]])
            loss = F.cross_entropy(model(px, w), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
        epochs = epoch + 1
        score = accuracy(val)
        if score > best:
            best, since = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= config.patience:
                break
    model.load_state_dict(best_state)
    result: dict[str, Any] = {"epochs": epochs, "val_accuracy": best, "seconds": time.perf_counter() - t0,
                              "parameters": sum(p.numel() for p in model.parameters())}
    for name, blank in (("accuracy", False), ("blind_accuracy", True)):
        preds = predict(test, blank)
        right, count = defaultdict(float), defaultdict(int)
        for p, (_, _, a, kind) in zip(preds, test):
            right[kind] += answers[p] == a
            count[kind] += 1
        result[name] = sum(right.values()) / len(test)
        result[f"{name}_by_type"] = {k: right[k] / count[k] for k in sorted(count)}
    result["num_questions"] = len(test)
    return result
