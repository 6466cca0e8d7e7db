"""`llava-smoe plan RECIPE [KEY=VALUE ...] --gpus N --gpu-memory GB`: memory and FLOPs of a recipe's run."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=8")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs (ZeRO shards over them)")
    parser.add_argument("--gpu-memory", type=float, required=True, metavar="GiB", help="memory of one GPU")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the recipe's max_length)")
    parser.add_argument("--images", type=int, default=1, help="images per sample (default 1)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of GPU memory kept free (CUDA context, allocator fragmentation; default 0.1)")
    parser.add_argument("--expert-parallel", type=int, default=1,
                        help="expert-parallel size for the no-ZeRO column (torch back end; default 1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from llava_smoe.plan import format_plan, plan_recipe

    plan = plan_recipe(args.recipe, args.overrides, gpus=args.gpus, gpu_memory_gb=args.gpu_memory,
                       seq_len=args.seq_len, images_per_sample=args.images, micro_batch_size=args.micro_batch_size,
                       headroom=args.headroom, expert_parallel=args.expert_parallel)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
