"""`llava-smoe bench moe|data|adamw|step|baseline|serve|memory`: time one MoE layer per router
against dense and transformers baselines; batches with and without the sample cache; fused AdamW
against the per-tensor loop; a stage's training step, broken down, for variants of its recipe; a
CNN classifier as the anchor a tiny VLM should beat; serving with continuous against static
batching; the planner's memory figures against measured peaks of CPU training steps."""

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

    step = sub.add_parser("step", help="a stage's training step broken down (data, forward, backward, ...), "
                                        "for variants of its recipe against the recipe as it is")
    step.add_argument("recipe", help="the stage's recipe")
    step.add_argument("--out", required=True, help="JSON file for the result rows")
    step.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override for every variant (e.g. the stage's data and init_from paths)")
    step.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                      help="a variant: a name, a colon, then overrides separated by spaces (repeatable)")
    step.add_argument("--steps", type=int, default=60, help="timed optimizer steps per run")
    step.add_argument("--warmup", type=int, default=10, help="untimed steps first, in every run")
    step.add_argument("--repeats", type=int, default=3, help="rounds (each runs every variant once)")
    step.add_argument("--profile", metavar="FILE", help="torch.profiler table of the recipe's first run")
    step.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")

    base = sub.add_parser("baseline", help="a CNN + question-encoder classifier trained to convergence on a "
                                           "LLaVA dataset: the non-LLM anchor, beside quickstart summaries")
    base.add_argument("--train", required=True, help="LLaVA .json of training questions")
    base.add_argument("--test", required=True, help="LLaVA .json of test questions")
    base.add_argument("--image-folder", required=True)
    base.add_argument("--val", help="validation questions for early stopping (default: the last 10%% of --train)")
    base.add_argument("--image-size", type=int, default=64)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--max-epochs", type=int, default=40, help="upper bound; training stops earlier on a plateau")
    base.add_argument("--summary", action="append", default=[], metavar="SUMMARY.json",
                      help="quickstart summaries of the same data, shown beside the baseline (repeatable)")
    base.add_argument("--out", required=True, help="JSON file for the result")
    base.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")

    adamw = sub.add_parser("adamw", help="AdamW steps: torch's fused kernel vs the per-tensor loop")
    adamw.add_argument("--out", required=True, help="JSON file for the result rows")
    adamw.add_argument("--hidden", type=int, default=128, help="hidden size D (default: the quickstart's LM)")
    adamw.add_argument("--ffn", type=int, default=256, help="FFN size F")
    adamw.add_argument("--layers", type=int, default=4)
    adamw.add_argument("--vocab", type=int, default=512)
    adamw.add_argument("--steps", type=int, default=50, help="optimizer steps per timed run")
    adamw.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both variants)")
    adamw.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")

    serve = sub.add_parser("serve", help="HTTP serving: continuous vs static batching on the same staggered streams")
    serve.add_argument("--out", required=True, help="JSON file for the result rows")
    serve.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a tiny random-weight one)")
    serve.add_argument("--streams", type=int, default=32, help="requests, one client stream each")
    serve.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together (both modes)")
    serve.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (Poisson)")
    serve.add_argument("--rounds", type=int, default=3, help="replays of the workload per mode, interleaved")
    serve.add_argument("--threads", type=int, default=1, help="torch threads of each server (default: 1)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--seed", type=int, default=0, help="seed of the workload (arrivals, prompts, reply lengths)")
    memory = sub.add_parser("memory", help="llava-smoe plan's memory figures vs measured peaks of CPU training steps")
    memory.add_argument("--out", required=True, help="JSON file for the result rows")
    memory.add_argument("--cases", default=None,
                        help="comma-separated cases (default: all, and zero3 unless --no-zero3)")
    memory.add_argument("--no-zero3", action="store_true", help="skip the 2-process ZeRO-3 dry run (~2 min)")


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return _run_serve(args)
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.bench_command == "moe":
        return _run_moe(args)
    if args.bench_command == "step":
        return _run_step(args)
    if args.bench_command == "baseline":
        return _run_baseline(args)
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


def _run_baseline(args: argparse.Namespace) -> int:
    from llava_smoe.bench.baseline import BaselineConfig, run_baseline

    result = run_baseline(BaselineConfig(train=args.train, test=args.test, image_folder=args.image_folder,
                                         val=args.val, image_size=args.image_size, seed=args.seed,
                                         max_epochs=args.max_epochs))
    summaries = [json.loads(Path(p).read_text()) for p in args.summary]
    result["summaries"] = [{"path": p, **{k: s[k] for k in ("accuracy", "blind_accuracy", "accuracy_by_type",
                                                            "blind_accuracy_by_type")}} for p, s in zip(args.summary, summaries)]
    _write([result], args.out)
    columns = ["CNN + GRU", *[f"pipeline {i}" for i in range(len(summaries))]]
    print(f"CNN + GRU baseline: {result['parameters']:,} parameters, {result['epochs']} epochs, "
          f"{result['seconds']:.0f} s; accuracy (blind)")
    print("| question type | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for kind in [*result["accuracy_by_type"], "all"]:
        cells = []
        for r in [result, *summaries]:
            acc = r["accuracy"] if kind == "all" else r["accuracy_by_type"].get(kind)
            blind = r["blind_accuracy"] if kind == "all" else r["blind_accuracy_by_type"].get(kind)
            cells.append("-" if acc is None else f"{acc:.3f} ({blind:.3f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")
    return 0


def _run_step(args: argparse.Namespace) -> int:
    from llava_smoe.bench.step import StepBenchConfig, markdown_table, run_step_bench

    variants: dict[str, list[str]] = {"recipe": []}
    for spec in args.variant:
        name, sep, overrides = spec.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--variant {spec!r}: expected 'NAME: KEY=VALUE ...'")
        variants[name.strip()] = overrides.split()
    config = StepBenchConfig(recipe=args.recipe, variants=variants, overrides=args.overrides, steps=args.steps,
                             warmup=args.warmup, repeats=args.repeats)
    rows = run_step_bench(config, Path(args.profile) if args.profile else None)
    _write(rows, args.out)
    print(f"{args.recipe}: {args.steps} steps per run after {args.warmup} warm-up, {args.repeats} interleaved "
          f"rounds, {rows[0]['threads']} threads, malloc {rows[0]['malloc']}, torch {rows[0]['torch']}; "
          "milliseconds per step")
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


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
        f"{r0['dtype']} on {r0['device']} ({r0['threads']} threads, malloc {r0['malloc']}), torch {r0['torch']}, "
        f"transformers {r0['transformers']}, {r0['repeats']} interleaved rounds"
    )
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from llava_smoe.bench.serve import ServeBenchConfig, markdown_table, run_serve_bench

    rows = run_serve_bench(ServeBenchConfig(
        checkpoint=args.checkpoint, streams=args.streams, max_batch_size=args.max_batch_size,
        arrival_rate=args.rate, rounds=args.rounds, threads=args.threads, device=args.device, seed=args.seed))
    _write(rows, args.out)
    r0 = rows[0]
    print(f"{r0['streams']} streams arriving at {r0['arrival_rate']}/s, max batch {r0['max_batch_size']}, "
          f"{r0['threads']} thread(s) on {r0['device']}, torch {r0['torch']}, {r0['rounds']} interleaved rounds")
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
