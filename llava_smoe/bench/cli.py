"""`llava-smoe bench moe|data|adamw|memory`: time one MoE layer per router against dense and
transformers baselines; batches with and without the sample cache; fused AdamW against the
per-tensor loop; the planner's memory figures against measured peaks of CPU training steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_smoe.pretrained import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    moe = sub.add_parser("moe", help="forward + backward of one MoE layer per router vs dense FFN and transformers")
    moe.add_argument("--out", required=True, help="JSON file for the result rows")
    moe.add_argument("--experts", type=int, default=8, help="number of experts E")
    moe.add_argument("--top-k", type=int, default=2, help="experts per token k")
    moe.add_argument("--hidden", type=int, default=512, help="hidden size D")
    moe.add_argument("--ffn", type=int, default=1024, help="expert FFN size F (the dense baseline has k*F)")
    moe.add_argument("--tokens", type=int, default=4096)
    moe.add_argument("--batch", type=int, default=8, help="tokens are laid out [batch, tokens/batch] (MoT groups across the batch)")
    moe.add_argument("--routers", default=None, help="comma-separated routers (default: every registered router)")
    moe.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    moe.add_argument("--device", default="cpu")
    moe.add_argument("--repeats", type=int, default=10, help="timed rounds (each round runs every variant once)")
    moe.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    moe.add_argument("--hf-experts", default="eager", help="transformers experts_implementation of the hf baseline")
    moe.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    moe.add_argument("--seed", type=int, default=0)

    data = sub.add_parser("data", help="epochs of batches with the in-memory sample cache vs without")
    data.add_argument("--out", required=True, help="JSON file for the result rows")
    data.add_argument("--data", required=True, help="LLaVA JSON (e.g. playground/data/shapes/instruct_train.json)")
    data.add_argument("--image-folder", required=True)
    data.add_argument("--processor", required=True, help="checkpoint or processor folder")
    data.add_argument("--epochs", type=int, default=3)
    data.add_argument("--batch", type=int, default=24)
    data.add_argument("--max-length", type=int, default=2048)
    data.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both variants)")
    data.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")

    adamw = sub.add_parser("adamw", help="AdamW steps: torch's fused kernel vs the per-tensor loop")
    adamw.add_argument("--out", required=True, help="JSON file for the result rows")
    adamw.add_argument("--hidden", type=int, default=128, help="hidden size D (default: the quickstart's LM)")
    adamw.add_argument("--ffn", type=int, default=256, help="FFN size F")
    adamw.add_argument("--layers", type=int, default=4)
    adamw.add_argument("--vocab", type=int, default=512)
    adamw.add_argument("--steps", type=int, default=50, help="optimizer steps per timed run")
    adamw.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both variants)")
    adamw.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")

    memory = sub.add_parser("memory", help="llava-smoe plan's memory figures vs measured peaks of CPU training steps")
    memory.add_argument("--out", required=True, help="JSON file for the result rows")
    memory.add_argument("--cases", default=None,
                        help="comma-separated cases (default: all, and zero3 unless --no-zero3)")
    memory.add_argument("--no-zero3", action="store_true", help="skip the 2-process ZeRO-3 dry run (~2 min)")


def run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.bench_command == "moe":
        return _run_moe(args)
    if args.bench_command == "memory":
        return _run_memory(args)
    from llava_smoe.bench import training

    if args.bench_command == "data":
        rows = training.run_data_bench(training.DataBenchConfig(
            data=args.data, image_folder=args.image_folder, processor=args.processor, epochs=args.epochs,
            batch=args.batch, max_length=args.max_length, repeats=args.repeats))
    else:
        rows = training.run_adamw_bench(training.AdamWBenchConfig(
            hidden_size=args.hidden, ffn_size=args.ffn, layers=args.layers, vocab_size=args.vocab,
            steps=args.steps, repeats=args.repeats))
    _write(rows, args.out)
    print(f"{args.bench_command}: {rows[0]['threads']} threads, torch {rows[0]['torch']}, {args.repeats} interleaved rounds")
    print(training.markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def _write(rows: list[dict], out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _run_moe(args: argparse.Namespace) -> int:
    from llava_smoe.bench.moe import MoEBenchConfig, markdown_table, run_moe_bench

    fields = dict(
        num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden, ffn_size=args.ffn,
        tokens=args.tokens, batch=args.batch, dtype=args.dtype, device=args.device,
        repeats=args.repeats, warmup=args.warmup, hf_experts=args.hf_experts, seed=args.seed,
    )
    if args.routers:
        fields["routers"] = [r.strip() for r in args.routers.split(",") if r.strip()]
    rows = run_moe_bench(MoEBenchConfig(**fields))
    _write(rows, args.out)
    r0 = rows[0]
    print(
        f"E={r0['num_experts']} k={r0['top_k']} D={r0['hidden_size']} F={r0['ffn_size']} tokens={r0['tokens']} "
        f"{r0['dtype']} on {r0['device']} ({r0['threads']} threads), torch {r0['torch']}, "
        f"transformers {r0['transformers']}, {r0['repeats']} interleaved rounds"
    )
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def _run_memory(args: argparse.Namespace) -> int:
    import tempfile

    from llava_smoe.bench import memory
    from llava_smoe.config import ConfigError

    names = [n.strip() for n in args.cases.split(",")] if args.cases else [c.name for c in memory.CASES] + ["zero3"]
    known = [c.name for c in memory.CASES] + ["zero3"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--cases: unknown {unknown}; known: {known}")
    rows = []
    for case in memory.CASES:
        if case.name in names:
            rows.append(memory.finish_row(memory.run_case(case)))
            print(f"{case.name}: done", flush=True)
    zero3 = []
    if "zero3" in names and not args.no_zero3:
        with tempfile.TemporaryDirectory() as work:
            zero3 = [memory.finish_zero3_row(r) for r in memory.run_zero3_case(work)["rows"]]
    _write(rows + zero3, args.out)
    if rows:
        print(memory.markdown_table(rows))
    if zero3:
        print(memory.zero3_table(zero3))
    print(f"wrote {args.out}")
    return 0
