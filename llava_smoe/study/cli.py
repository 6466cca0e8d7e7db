"""`llava-smoe study SPEC.yaml`: run a study's cells (resumably), then write study.json, study.md
and the plots.

    llava-smoe study train/study/text-routers.yaml --workers 2
    llava-smoe study SPEC.yaml --report-only          # aggregate what has finished
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study spec (YAML): recipe, variants, seeds, primary metric, baseline")
    parser.add_argument("--out", help="study folder (default: playground/studies/<name>)")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once; each gets cores / workers threads")
    parser.add_argument("--threads", type=int, help="threads per cell (default: cores / workers), to leave cores free")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="go on although recorded cells differ in code, settings, packages or device")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the finished cells")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every shared stage and cell, print each cell's resolved overrides and exit")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from llava_smoe.study.report import write_report
    from llava_smoe.study.runner import Study, StudyError
    from llava_smoe.study.spec import load_spec

    spec, spec_dir = load_spec(args.spec)
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out or f"playground/studies/{spec.name}").resolve()
    study = Study(spec, spec_dir, out, workers=args.workers, threads=args.threads,
                  allow_mixed=args.allow_mixed,
                  log=lambda line: print(f"==> {line}", flush=True))
    try:
        if args.dry_run:
            for seed in spec.seeds:
                study.check_shared(seed)
            for cell in study.cells:
                study.resolved_config(cell)  # validates the whole recipe of every cell
                print(f"{cell.key}: {' '.join(study.cell_overrides(cell))}")
            return 0
        records = [c.record() for c in study.cells] if args.report_only else study.run()
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = [r for r in records if r and r.get("status") == "done"]
    if not done:
        print("error: no finished cell to report", file=sys.stderr)
        return 1
    report = write_report(spec, records, out)
    print((out / "study.md").read_text())
    print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {len(report['plots'])} plots")
    if report["under_budget"]:
        print(f"error: cells under the token budget of {spec.min_tokens:,}: {', '.join(report['under_budget'])}",
              file=sys.stderr)
        return 1
    return 0 if len(done) == len(study.cells) else 1
