"""`llava-smoe compare RUN_DIR... --out DIR`: one table and plots from several training runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (with metrics.jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where comparison.md and the PNG plots go")


def run(args: argparse.Namespace) -> int:
    import sys

    from llava_smoe.evaluation.compare import compare_runs

    try:
        written = compare_runs(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written["table"].read_text(), end="")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
