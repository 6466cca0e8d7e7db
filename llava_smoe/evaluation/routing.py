"""Routing analysis of a MoE checkpoint over LLaVA-JSON samples (`llava-smoe inspect`).

Per MoE layer: tokens per expert for text and image tokens, load coefficient of variation,
router entropy, dead experts; for CompeteSMoE layers, how often the router's top-k matches
the experts competition would pick (all experts run on the layer's input, captured by a
forward hook; the MoE layers themselves are not changed).

Samples run one at a time: padding tokens would otherwise be routed and counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from llava_smoe.moe.routers.base import load_cv
from llava_smoe.moe.routers.competesmoe import neural_response

LM_PREFIX = "language_model."


def _cv(counts: list[float]) -> float:
    return load_cv(torch.tensor(counts))


class CompetitionProbe:
    """Forward hooks on CompeteSMoE layers comparing the router's top-k with competition's.

    Counts per layer and modality: tokens, tokens whose top-k sets are equal, overlap of the
    two sets (|router ∩ competition| / k, CompeteSMoE's own agreement measure) and top-1 matches.
    """

    def __init__(self, layers: list[tuple[str, Any]]):
        from llava_smoe.moe.routers.competesmoe import CompeteSMoERouter

        self.layers = [(name, layer) for name, layer in layers if isinstance(layer.router, CompeteSMoERouter)]
        self.counts: dict[str, dict[str, dict[str, float]]] = {}
        self.image_mask: torch.Tensor | None = None  # [B*S] for language-model inputs of this forward
        self._handles: list = []

    def __enter__(self) -> CompetitionProbe:
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(layer, inputs, output):
            x = inputs[0]
            x_TD = x.reshape(-1, x.shape[-1])
            K = layer.config.top_k
            router_idx_TK = layer.router.gate(x_TD).expert_idx_TK
            affinity_TE = neural_response(layer.experts.forward_all(x_TD), layer.router.opts.affinity)
            comp_idx_TK = affinity_TE.topk(K, dim=-1).indices
            hit_TK = (router_idx_TK.unsqueeze(-1) == comp_idx_TK.unsqueeze(1)).any(-1)
            overlap_T = hit_TK.float().mean(-1)
            top1_T = (router_idx_TK[:, 0] == comp_idx_TK[:, 0]).float()
            if name.startswith(LM_PREFIX) and self.image_mask is not None and self.image_mask.numel() == x_TD.shape[0]:
                image_T = self.image_mask.to(x_TD.device)
            else:  # vision tower / projector layers see image patches only
                image_T = torch.full((x_TD.shape[0],), not name.startswith(LM_PREFIX), device=x_TD.device)
            for modality, mask_T in (("text", ~image_T), ("image", image_T)):
                c = self.counts.setdefault(name, {}).setdefault(
                    modality, {"tokens": 0.0, "exact": 0.0, "overlap": 0.0, "top1": 0.0})
                c["tokens"] += float(mask_T.sum())
                c["exact"] += float((overlap_T[mask_T] == 1.0).sum())
                c["overlap"] += float(overlap_T[mask_T].sum())
                c["top1"] += float(top1_T[mask_T].sum())
        return hook

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, by_modality in self.counts.items():
            layer_out: dict[str, Any] = {}
            total = {k: sum(c[k] for c in by_modality.values()) for k in ("tokens", "exact", "overlap", "top1")}
            for modality, c in {**by_modality, "all": total}.items():
                n = c["tokens"]
                layer_out[modality] = {
                    "tokens": int(n),
                    "topk_overlap": c["overlap"] / n if n else None,
                    "topk_exact_match": c["exact"] / n if n else None,
                    "top1_match": c["top1"] / n if n else None,
                }
            out[name] = layer_out
        return out


@dataclass
class RoutingReport:
    layers: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    num_samples: int
    num_tokens: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "summary": self.summary,
                "layers": self.layers}


def _layer_report(name: str, layer: Any, stats: dict[str, Any]) -> dict[str, Any]:
    E = layer.config.num_experts
    total = stats.get("tokens_per_expert", [0.0] * E)
    if name.startswith(LM_PREFIX):
        text = stats.get("tokens_per_expert_text", [0.0] * E)
        image = stats.get("tokens_per_expert_image", [0.0] * E)
    else:  # the vision tower and projector only ever see image patches
        text, image = [0.0] * E, list(total)
    report: dict[str, Any] = {
        "router": layer.config.router,
        "num_experts": E,
        "top_k": layer.config.top_k,
        "tokens_per_expert": total,
        "tokens_per_expert_text": text,
        "tokens_per_expert_image": image,
        "load_cv": _cv(total),
        "load_cv_text": _cv(text) if sum(text) else None,
        "load_cv_image": _cv(image) if sum(image) else None,
        "dead_experts": int(sum(1 for c in total if c == 0)),
        "dead_experts_text": int(sum(1 for c in text if c == 0)) if sum(text) else None,
        "dead_experts_image": int(sum(1 for c in image if c == 0)) if sum(image) else None,
    }
    for key in ("router_entropy", "router_entropy_normalized"):
        if key in stats:
            report[key] = stats[key]
    return report


@torch.no_grad()
def analyze_routing(model: Any, processor: Any, data_path: str, image_folder: str | None = None,
                    limit: int | None = None) -> RoutingReport:
    """Run the model over the first `limit` samples of a LLaVA JSON file and collect routing."""
    from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
    from llava_smoe.data.dataset import SkippedSample
    from llava_smoe.moe import moe_layers, routing_stats

    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to inspect")
    model.eval()
    dataset = LlavaDataset(DataConfig(data_path, image_folder, on_bad_sample="skip"), processor)
    collate = DataCollator.from_processor(processor)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    image_id = processor.image_token_id

    routing_stats(model, reset=True)  # drop whatever earlier forwards left behind
    probe = CompetitionProbe(layers)
    n_samples, n_text, n_image = 0, 0, 0
    with probe:
        for index in range(len(dataset)):
            if limit is not None and n_samples >= limit:
                break
            sample = dataset[index]
            if isinstance(sample, SkippedSample):
                continue
            batch = collate([sample])
            input_ids = batch["input_ids"].to(device)
            image_mask = (input_ids == image_id).reshape(-1)
            probe.image_mask = image_mask
            pixel_values = batch["pixel_values"].to(device, dtype) if "pixel_values" in batch else None
            model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), pixel_values=pixel_values)
            n_samples += 1
            n_image += int(image_mask.sum())
            n_text += int(image_mask.numel() - image_mask.sum())
    if n_samples == 0:
        raise ValueError(f"no usable samples in {data_path} (all skipped: {dataset.skip_stats.as_dict()})")

    stats = routing_stats(model, reset=True)
    competition = probe.summary()
    reports: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        reports[name] = _layer_report(name, layer, stats.get(name, {}))
        if name in competition:
            reports[name]["competition_agreement"] = competition[name]

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in reports.values() if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    summary: dict[str, Any] = {
        "moe_layers": len(reports),
        "load_cv": mean_of("load_cv"),
        "load_cv_text": mean_of("load_cv_text"),
        "load_cv_image": mean_of("load_cv_image"),
        "router_entropy_normalized": mean_of("router_entropy_normalized"),
        "dead_experts": sum(r["dead_experts"] for r in reports.values()),
    }
    if competition:
        for key in ("topk_overlap", "topk_exact_match", "top1_match"):
            vals = [c["all"][key] for c in competition.values() if c["all"][key] is not None]
            summary[f"competition_{key}"] = sum(vals) / len(vals) if vals else None
    return RoutingReport(reports, summary, n_samples, {"text": n_text, "image": n_image})


def plot_routing(report: RoutingReport, path: str) -> str:
    """Heatmaps (MoE layer x expert) of each expert's share of the layer's assignments, for all,
    text and image tokens; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report.layers)
    E = max(r["num_experts"] for r in report.layers.values())
    panels = [("all tokens", "tokens_per_expert"), ("text tokens", "tokens_per_expert_text"),
              ("image tokens", "tokens_per_expert_image")]
    shares = []
    for _, key in panels:
        share = np.full((len(names), E), np.nan)
        for i, name in enumerate(names):
            counts = np.asarray(report.layers[name][key], dtype=float)
            if counts.sum() > 0:
                share[i, : len(counts)] = counts / counts.sum()
        shares.append(share)
    # One colour scale for all panels, so text and image loads compare at a glance.
    vmax = max((float(np.nanmax(s)) for s in shares if np.isfinite(s).any()), default=1.0)
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * E * 3, 2.5 + 0.35 * len(names)), squeeze=False)
    for ax, (title, _), share in zip(axes[0], panels, shares):
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_short(n) for n in names] if ax is axes[0][0] else [])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of assignments")
    fig.suptitle(f"expert load per MoE layer ({report.num_samples} samples; uniform = {1 / E:.2f})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """'language_model.model.layers.3.mlp' -> 'lm.3'; vision tower / projector names shortened alike."""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    prefix = {"language_model": "lm", "vision_tower": "vt", "projector": "proj"}.get(parts[0], parts[0])
    return f"{prefix}.{'.'.join(digits)}" if digits else prefix


def write_report(report: RoutingReport, out_dir: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
    """`routing.json` and `routing_heatmap.png` under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "routing.json")
    with open(json_path, "w") as f:
        json.dump({**(meta or {}), **report.to_dict()}, f, indent=2)
    return {"json": json_path, "heatmap": plot_routing(report, os.path.join(out_dir, "routing_heatmap.png"))}

