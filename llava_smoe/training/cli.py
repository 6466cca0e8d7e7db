"""`llava-smoe train RECIPE.yaml [key.sub=value ...]`: parse, build, run.

Several processes: `torchrun --nproc-per-node N -m llava_smoe.cli train RECIPE.yaml ...`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (may name a `base:` recipe it extends)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides parsed as YAML, e.g. train.max_steps=100 optim.groups.0.lr=2e-5")
    parser.add_argument("--resume", metavar="auto|PATH", help="shorthand for train.resume=...")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (every section, defaults filled in) and exit")


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    import yaml

    from llava_smoe.training.recipe import load_recipe

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    config = load_recipe(args.recipe, overrides)  # a bad recipe: one line from llava_smoe.cli
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from llava_smoe.training.trainer import train

    result = train(config)
    if result.status == "nonfinite":
        return 1
    return 0
