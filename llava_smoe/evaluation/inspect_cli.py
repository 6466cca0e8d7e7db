"""`llava-smoe inspect`: how a MoE checkpoint routes text and image tokens.

    llava-smoe inspect CKPT --data playground/data/shapes/instruct_test.json --out runs/inspect --limit 200

Writes routing.json (per layer: tokens per expert by modality, load CV, router entropy, dead
experts, CompeteSMoE router/competition agreement) and routing_heatmap.png under --out.
"""

from __future__ import annotations

import argparse

from llava_smoe.pretrained import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (model + processor, from save_pretrained)")
    parser.add_argument("--data", required=True, help="LLaVA .json/.jsonl samples to run")
    parser.add_argument("--image-folder", help="images of --data (default: images/ next to it, else its folder)")
    parser.add_argument("--limit", type=int, default=256, help="samples to run (default 256)")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    import json

    from llava_smoe.evaluation.questions import default_image_folder
    from llava_smoe.evaluation.routing import analyze_routing, write_report
    from llava_smoe.pretrained import load_pretrained

    if args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    model, processor = load_pretrained(args.checkpoint, dtype=args.dtype, device=args.device)
    image_folder = args.image_folder or default_image_folder(args.data)
    report = analyze_routing(model, processor, args.data, image_folder, limit=args.limit)
    paths = write_report(report, args.out, meta={"checkpoint": args.checkpoint, "data": args.data})
    print(json.dumps({"summary": report.summary, "num_tokens": report.num_tokens, **paths}, indent=1))
    return 0
