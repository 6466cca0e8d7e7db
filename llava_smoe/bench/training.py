"""Two parts of a training step outside the model, each against its baseline in one process.

- `data`: building batches (decode, preprocess, tokenise, collate) for several epochs of a LLaVA
  dataset, with the in-memory sample cache (`DataConfig.cache`) against without it.
- `adamw`: one AdamW step over a transformer's parameter shapes, torch's fused kernel against the
  per-tensor loop (`optim.fused`).

Variants run round-robin, one run of each per round with the starting variant rotated, so a noisy
moment on a shared machine hits both; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from llava_smoe.config import Config

from .moe import _ratios, time_interleaved


def _rows(times: dict[str, list[float]], baseline: str, unit_count: int, unit: str, setup: dict) -> list[dict]:
    rows = []
    for name, ts in times.items():
        rows.append({"variant": name, f"ms_per_{unit}": 1e3 * statistics.median(ts) / unit_count,
                     "ms_min": 1e3 * min(ts) / unit_count, "ms_max": 1e3 * max(ts) / unit_count,
                     "ratio_to_baseline": statistics.median(_ratios(ts, times[baseline])), "baseline": baseline,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, **setup})
    return rows


@dataclass
class DataBenchConfig(Config):
    data: str            # LLaVA JSON
    image_folder: str
    processor: str       # a checkpoint or processor folder
    epochs: int = 3
    batch: int = 24
    max_length: int = 2048
    repeats: int = 3
    warmup: int = 0

    def validate(self) -> None:
        for name in ("epochs", "batch", "repeats", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataBenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"DataBenchConfig.warmup must be >= 0, got {self.warmup}")


def run_data_bench(config: DataBenchConfig) -> list[dict]:
    """Epochs of batches from a fresh dataset per run: `uncached` (baseline) and `cached`."""
    from torch.utils.data import DataLoader

    from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
    from llava_smoe.processing import LlavaSmoeProcessor

    processor = LlavaSmoeProcessor.from_pretrained(config.processor)
    collate = DataCollator.from_processor(processor)
    batches = 0

    def epochs(cache: bool) -> Callable[[], None]:
        def go() -> None:
            nonlocal batches
            dataset = LlavaDataset(DataConfig(config.data, config.image_folder, config.max_length, cache=cache), processor)
            loader = DataLoader(dataset, batch_size=config.batch, shuffle=True, collate_fn=collate,
                                generator=torch.Generator().manual_seed(0))
            batches = config.epochs * len(loader)
            for _ in range(config.epochs):
                for _ in loader:
                    pass
        return go

    times = time_interleaved({"uncached": epochs(False), "cached": epochs(True)}, config.repeats, config.warmup,
                             torch.device("cpu"))
    setup = {"epochs": config.epochs, "batch": config.batch, "data": config.data}
    return _rows(times, "uncached", batches, "batch", setup)


@dataclass
class AdamWBenchConfig(Config):
    hidden_size: int = 128
    ffn_size: int = 256
    layers: int = 4
    vocab_size: int = 512
    steps: int = 50
    repeats: int = 5
    warmup: int = 1

    def validate(self) -> None:
        for name in ("hidden_size", "ffn_size", "layers", "vocab_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdamWBenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"AdamWBenchConfig.warmup must be >= 0, got {self.warmup}")


def run_adamw_bench(config: AdamWBenchConfig) -> list[dict]:
    """`steps` AdamW steps over a decoder's parameter shapes (attention, SwiGLU FFN, two norms per
    layer; embeddings): the per-tensor loop (`loop`, baseline) and torch's fused kernel (`fused`)."""
    D, F = config.hidden_size, config.ffn_size
    shapes = [(config.vocab_size, D), (D,)]
    for _ in range(config.layers):
        shapes += [(D, D)] * 4 + [(F, D), (F, D), (D, F), (D,), (D,)]
    generator = torch.Generator().manual_seed(0)

    def steps(fused: bool) -> Callable[[], None]:
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=None if fused else False)

        def go() -> None:
            for _ in range(config.steps):
                optimizer.step()
        return go

    times = time_interleaved({"loop": steps(False), "fused": steps(True)}, config.repeats, config.warmup,
                             torch.device("cpu"))
    setup = {"tensors": len(shapes), "parameters": sum(torch.Size(s).numel() for s in shapes), "steps": config.steps}
    return _rows(times, "loop", config.steps, "step", setup)


def markdown_table(rows: list[dict]) -> str:
    unit = next(k for k in rows[0] if k.startswith("ms_per_"))
    lines = [f"| variant | {unit.replace('_', ' ')} (median) | ms (min-max) | x {rows[0]['baseline']} |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r[unit]:.2f} | {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['ratio_to_baseline']:.2f} |")
    return "\n".join(lines)
