"""`llava-smoe eval`: lmms-eval benchmarks and local tasks for one or several checkpoints.

    llava-smoe eval CKPT --tasks llava_smoe_shapes --data playground/data/shapes/instruct_test.json --out runs/eval
    llava-smoe eval --compare CKPT_A CKPT_B --tasks gqa,pope --limit 500 --out runs/compare
    llava-smoe eval --export-parquet shapes_test.parquet --data playground/data/shapes/instruct_test.json
"""

from __future__ import annotations

import argparse

from llava_smoe.pretrained import DTYPES


def _limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (model + processor, from save_pretrained)")
    parser.add_argument("--compare", nargs="+", metavar="CKPT", default=[],
                        help="evaluate several checkpoints and put them side by side in one table")
    parser.add_argument("--tasks", help="comma-separated lmms-eval task names, local ones included "
                                        "(llava_smoe_shapes, llava_smoe_vqa)")
    parser.add_argument("--data", help="LLaVA .json/.jsonl or .parquet question/answer file for the local tasks")
    parser.add_argument("--image-folder", help="images of --data (default: images/ next to it, else its folder)")
    parser.add_argument("--limit", type=_limit, help="documents per task (a fraction below 1 means a share)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for tasks that set no limit themselves")
    parser.add_argument("--gen-kwargs",
                        help="override every task's generation settings, e.g. 'temperature=0,max_new_tokens=16'")
    parser.add_argument("--include-path", action="append", default=[], help="extra folder of lmms-eval task YAMLs")
    parser.add_argument("--no-samples", action="store_true", help="do not write per-document samples")
    parser.add_argument("--out", help="output folder (results, samples, task YAMLs, results.md)")
    parser.add_argument("--export-parquet", metavar="OUT.parquet",
                        help="only export --data (LLaVA JSON) to a parquet file for the local tasks, then exit")


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.export_parquet:
        from llava_smoe.evaluation.questions import export_parquet, load_questions

        if not args.data:
            raise SystemExit("--export-parquet needs --data (a LLaVA .json/.jsonl file)")
        items = load_questions(args.data, args.image_folder)
        export_parquet(items, args.export_parquet)
        print(f"wrote {len(items)} questions to {args.export_parquet}")
        return 0

    checkpoints = ([args.checkpoint] if args.checkpoint else []) + list(args.compare)
    if not checkpoints:
        raise SystemExit("give a checkpoint folder (or --compare CKPT ...)")
    if not args.tasks or not args.out:
        raise SystemExit("--tasks and --out are required")

    import sys

    from llava_smoe.evaluation.harness import (
        EvalConfig,
        EvalError,
        markdown_table,
        run_eval,
    )

    try:
        config = EvalConfig(
            checkpoints=checkpoints, tasks=args.tasks.split(","), out=args.out, data=args.data,
            image_folder=args.image_folder, limit=args.limit, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, max_new_tokens=args.max_new_tokens, gen_kwargs=args.gen_kwargs,
            log_samples=not args.no_samples, extra_include_paths=args.include_path,
        )
        results = run_eval(config)
    except (EvalError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if results:
        print(markdown_table(results), end="")
    return 0
