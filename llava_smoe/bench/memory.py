"""The planner's memory figures against measured peaks of real training steps on CPU.

Each case builds a VLM at real widths (published architectures, a few blocks), random weights,
fp32, and runs training steps (forward with the MoE aux losses, backward, fused AdamW) on one
micro-batch of `seq_len` tokens, 576 of them an image's. It runs in a fresh process whose
allocator returns every block over 64 KiB to the system (`MALLOC_MMAP_THRESHOLD_`), so the
resident set follows live tensors. Gradients are kept between steps (`zero_grad(set_to_none=
False)`, as DDP's and ZeRO's persistent buffers do), so:

- model states = resident set after the first step - resident set before building the model;
- activations = peak resident set during the next step (kernel reset with /proc/self/clear_refs)
  - resident set before it.

Each is compared with `llava_smoe.plan` for the same model (no ZeRO, one GPU, fp32). The
`zero3` case instead runs the trainer under torchrun on two gloo processes (DeepSpeed ZeRO-3)
and compares the larger rank's peak resident set, less that of a process that only imported
the same modules, with the plan's ZeRO-3 column plus activations.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from llava_smoe.config import Config, invalid, parse

IMAGE_TOKENS = 576  # CLIP ViT-L/14-336


@dataclass
class MemoryCase(Config):
    name: str
    vision: str = "clip-vit-large-patch14-336"
    vision_layers: int = 2
    language_model: str = "qwen2.5-0.5b-instruct"
    lm_layers: int = 2
    vocab_size: int | None = None  # None: the architecture's
    router: str = "smoe"
    competition: bool = False  # CompeteSMoE with competition on every step
    num_experts: int = 4
    top_k: int = 2
    micro_batch_size: int = 1
    seq_len: int = 640
    gradient_checkpointing: bool = False
    train: Literal["all", "experts"] = "all"  # "experts": experts, routers and projector (as stage 3)

    def validate(self) -> None:
        if self.seq_len <= IMAGE_TOKENS:
            raise invalid("seq_len", f"must exceed the image's {IMAGE_TOKENS} tokens, got {self.seq_len}")
        if self.competition and self.router != "competesmoe":
            raise invalid("competition", "needs router: competesmoe")

    def model_config(self) -> dict:
        options = {"warmup_fraction": 0.0, "competition_prob": 1.0} if self.competition else {}
        lm = {"num_hidden_layers": self.lm_layers, **({"vocab_size": self.vocab_size} if self.vocab_size else {})}
        return {
            "vision": {"backend": "hf", "architecture": self.vision, "hf_config": {"num_hidden_layers": self.vision_layers}},
            "language_model": {"architecture": self.language_model, "config": lm},
            "projector": {"type": "mlp2x_gelu"},
            "image_token_id": 0,
            "moe": {"router": self.router, "num_experts": self.num_experts, "top_k": self.top_k,
                    "router_options": options},
            "moe_placement": {"language_model": "every_other"},
        }

    def groups(self) -> list[dict]:
        if self.train == "all":
            return [{"name": "all", "patterns": ["projector.*", "language_model.*"], "lr": 1e-5}]
        return [{"name": "moe", "patterns": ["projector.*", "language_model.*.mlp.*"], "lr": 1e-5}]


# The first cases are dominated by Qwen's 151,936-token vocabulary (logits, loss, embedding
# gradients); the "layers" cases, with a small vocabulary, by what the decoder layers keep.
CASES = [
    MemoryCase("smoe"),
    MemoryCase("checkpointing", micro_batch_size=2, gradient_checkpointing=True),
    MemoryCase("wide-lm", language_model="qwen2.5-1.5b-instruct", vocab_size=32064, seq_len=1024),
    MemoryCase("layers-router", vocab_size=4096, lm_layers=6, seq_len=1600),
    MemoryCase("layers-competition", vocab_size=4096, lm_layers=6, seq_len=1600, router="competesmoe",
               competition=True),
    MemoryCase("layers-competition-ckpt", vocab_size=4096, lm_layers=6, seq_len=1600, router="competesmoe",
               competition=True, gradient_checkpointing=True, micro_batch_size=2),
    MemoryCase("layers-experts-only", vocab_size=4096, lm_layers=6, seq_len=1600, router="competesmoe",
               competition=True, train="experts"),
]
def _status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark restarts at the current RSS


def measure(case: MemoryCase) -> dict:
    """Run in a fresh process: build, train two steps, measure; returns plan and measurement."""
    import torch

    from llava_smoe.model import build_model
    from llava_smoe.moe import collect_aux_losses, configure_moe_schedule
    from llava_smoe.plan import PlanSettings, plan_model
    from llava_smoe.training.config import OptimConfig
    from llava_smoe.training.optim import build_optimizer, build_param_groups

    torch.manual_seed(0)
    before = _status("VmRSS")
    model = build_model(case.model_config())
    groups, _, _ = build_param_groups(model, parse(OptimConfig, {"groups": case.groups()}))
    optimizer = build_optimizer(groups, parse(OptimConfig, {"groups": case.groups()}))
    configure_moe_schedule(model, 10)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    B, S = case.micro_batch_size, case.seq_len
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (B, S), generator=g)
    input_ids[:, 1:1 + IMAGE_TOKENS] = 0
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones(B, S, dtype=torch.long),
             "pixel_values": torch.randn(B, 3, model.vision_tower.image_size, model.vision_tower.image_size,
                                         generator=g)}

    def step() -> float:
        out = model(**batch)
        loss = out.loss + sum(collect_aux_losses(model).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(loss)

    step()
    steady = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    plan = plan_model(model, PlanSettings(gpus=1, gpu_memory_gb=1024, backend="torch", precision="fp32",
                                          micro_batch_size=B, seq_len=S,
                                          gradient_checkpointing=case.gradient_checkpointing))
    fit = next(r for r in plan["fit"] if r["stage"] == "none" and r["checkpointing"] == case.gradient_checkpointing)
    return {"case": case.name, "parameters": plan["parameters"]["total"], "trainable": plan["parameters"]["trainable"],
            "planned_states": plan["model_states"]["none"]["total"], "measured_states": steady - before,
            "planned_activations": fit["activation_bytes"], "measured_activations": peak - steady,
            "step_seconds": seconds, "config": asdict(case)}


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def run_case(case: MemoryCase) -> dict:
    """`measure(case)` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "llava_smoe.bench.memory", json.dumps(asdict(case))],
                          capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {case.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finish_row(row: dict) -> dict:
    row["states_ratio"] = row["planned_states"] / row["measured_states"]
    row["activations_ratio"] = row["planned_activations"] / row["measured_activations"]
    row["total_ratio"] = (row["planned_states"] + row["planned_activations"]) / (
        row["measured_states"] + row["measured_activations"])
    return row


def markdown_table(rows: list[dict]) -> str:
    gib = float(1 << 30)
    lines = ["| case | parameters | states plan / measured (GiB) | activations plan / measured (GiB) | total plan / measured |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['parameters'] / 1e6:.0f}M | {r['planned_states'] / gib:.2f} / "
                     f"{r['measured_states'] / gib:.2f} ({r['states_ratio']:.2f}) | {r['planned_activations'] / gib:.2f}"
                     f" / {r['measured_activations'] / gib:.2f} ({r['activations_ratio']:.2f}) | {r['total_ratio']:.2f} |")
    return "\n".join(lines)


DRYRUN_RECIPE = "train/dryrun/clip336-qwen05-competesmoe-zero3.yaml"
BASELINE = """
import sys, torch.distributed as dist
import deepspeed, transformers
from llava_smoe.training import trainer
from llava_smoe.tasks import vlm
from llava_smoe.model import modeling
dist.init_process_group("gloo")
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
dist.destroy_process_group()
"""


def _record_peaks(out_dir: str) -> None:
    """In a rank of the trainer: write the peak resident set after each optimizer step."""
    from llava_smoe.training import trainer

    real = trainer.moe_optimizer_step
    peaks: list[int] = []
    rank = os.environ.get("RANK", "0")

    def step_and_record(model, step):
        real(model, step)
        peaks.append(_status("VmHWM"))
        Path(out_dir, f"peaks-rank-{rank}.json").write_text(json.dumps(peaks))

    trainer.moe_optimizer_step = step_and_record


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    from llava_smoe.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc


def _trained_lengths(data_dir: Path, steps: int, world: int) -> dict[int, int]:
    """The longest sequence each rank trains in `steps` steps of micro-batch 1 (the sampler's order)."""
    from transformers import AutoTokenizer

    from llava_smoe.data.dataset import DataConfig, LlavaDataset
    from llava_smoe.processing import ImageProcessingConfig, LlavaSmoeProcessor, ProcessorConfig
    from llava_smoe.training.data import ResumableSampler

    processor = LlavaSmoeProcessor(AutoTokenizer.from_pretrained(data_dir / "tokenizer"), ProcessorConfig(
        template="chatml", num_image_tokens=IMAGE_TOKENS, image=ImageProcessingConfig(image_size=336)))
    dataset = LlavaDataset(DataConfig(str(data_dir / "train.json"), str(data_dir / "images")), processor)
    return {rank: max(len(dataset[i]["input_ids"])
                      for i in ResumableSampler(len(dataset), seed=0, rank=rank, world_size=world).order(0)[:steps])
            for rank in range(world)}


def run_zero3_case(work_dir: str, steps: int = 2) -> dict:
    """The dry-run recipe (real widths, ZeRO-3, bf16) on 2 gloo processes: each rank's peak
    resident set during training, less a process that imported the same modules, against the
    plan's ZeRO-3 model states plus the activations of that rank's longest sequence."""
    from llava_smoe.data.mix665k import Mix665kConfig, generate_mix665k
    from llava_smoe.plan import plan_recipe

    work = Path(work_dir)
    data = work / "data"
    generate_mix665k(Mix665kConfig(num_records=16, max_words=200), str(data))
    overrides = [f"vlm.data={data / 'train.json'}", f"vlm.image_folder={data / 'images'}",
                 f"vlm.tokenizer={data / 'tokenizer'}", f"train.output_dir={work / 'run'}", f"train.max_steps={steps}",
                 "train.save_every=0"]
    root = Path(__file__).resolve().parents[2]
    _torchrun(["-m", "llava_smoe.bench.memory", "--zero3-rank", str(work), str(root / DRYRUN_RECIPE), *overrides], 2)
    baseline_script = work / "baseline.py"
    baseline_script.write_text(BASELINE)
    baseline = max(int(line) for line in _torchrun([str(baseline_script)], 2).stdout.split() if line.isdigit())
    lengths = _trained_lengths(data, steps, 2)
    rows = []
    for rank, seq in lengths.items():
        plan = plan_recipe(root / DRYRUN_RECIPE, overrides, gpus=2, gpu_memory_gb=1024, seq_len=seq)
        fit = next(r for r in plan["fit"] if r["stage"] == "zero3" and not r["checkpointing"])
        peak = max(json.loads((work / f"peaks-rank-{rank}.json").read_text()))
        rows.append({"case": f"zero3-rank{rank}", "parameters": plan["parameters"]["total"],
                     "trainable": plan["parameters"]["trainable"], "seq_len": seq,
                     "planned_states": fit["model_states_bytes"], "planned_activations": fit["activation_bytes"],
                     "measured_peak": peak - baseline, "process_baseline": baseline})
    return {"rows": rows}


def finish_zero3_row(row: dict) -> dict:
    row["total_ratio"] = (row["planned_states"] + row["planned_activations"]) / row["measured_peak"]
    return row


def zero3_table(rows: list[dict]) -> str:
    gib = float(1 << 30)
    lines = ["| rank | longest sequence | plan: states + activations (GiB) | measured peak - baseline (GiB) | plan / measured |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['seq_len']} | {r['planned_states'] / gib:.2f} + {r['planned_activations'] / gib:.2f}"
                     f" | {r['measured_peak'] / gib:.2f} | {r['total_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--zero3-rank":  # a rank of the trainer under torchrun
        from llava_smoe.training.recipe import load_recipe
        from llava_smoe.training.trainer import train

        _record_peaks(sys.argv[2])
        sys.exit(0 if train(load_recipe(sys.argv[3], sys.argv[4:])).status == "completed" else 1)
    print(json.dumps(measure(parse(MemoryCase, json.loads(sys.argv[1])))))
