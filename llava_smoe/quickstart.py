"""The embedded default, end to end: synthetic data, every tiny stage, held-out evaluation.

`llava-smoe quickstart` (what `scripts/quickstart.sh` runs) generates the shapes world, pretrains
the tiny vision tower contrastively on its captions (CLIP's loss) and the tiny language model on
its text, pretrains the projector (and the LM) on the captions with the tower frozen, upcycles
the LM into MoE layers with the chosen router and instruction-tunes (a Mixture of Tokens model
is then converted to token-choice routing and briefly re-tuned), then answers the held-out test
questions twice: with the image, and with the image replaced by a blank one (the answers must
depend on the image). Results go to `OUT/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

STAGES = ("vision", "lm", "pretrain", "finetune_moe")
TRANSITION_STEPS = 150  # Mixture of Tokens only: token-choice re-tuning before evaluation
IMAGE_SIZE = 32  # the tiny tower sees 16 px patches: one per grid cell
NUM_TRAIN_IMAGES = 8000  # distinct layouts: fewer and the tiny model memorises scenes instead of learning cells
# ~2,000 test questions: the standard error of the accuracy is ~0.007 (~0.015 with the generator's
# default 200 images), small enough to compare routers on one run each.
NUM_TEST_IMAGES = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llava_smoe.moe.routers import BUILTIN_ROUTERS

    parser.add_argument("--router", default="competesmoe", choices=BUILTIN_ROUTERS,
                        help="router of the MoE stage (default: competesmoe)")
    parser.add_argument("--out", default="playground/quickstart", help="where checkpoints and results go")
    parser.add_argument("--data", default="playground/data/shapes", help="where the synthetic data goes")
    parser.add_argument("--recipes", default="train/tiny", help="folder of the tiny stage recipes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN_IMAGES,
                        help=f"training images to generate (default: {NUM_TRAIN_IMAGES})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted recipe override applied to every stage, e.g. train.max_steps=20 (repeatable)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_quickstart(Path(args.out), Path(args.data), Path(args.recipes), args.router, args.seed,
                             progress=not args.no_progress, num_train=args.num_train, overrides=args.overrides)
    print_summary(summary)
    return 0


def _synthesize(data: Path, seed: int, num_train: int, num_test: int) -> None:
    from llava_smoe.data import ShapesWorldConfig, generate_shapes_world

    # Captions name the objects in random order: each "in the <cell>" is then a lookup of the named
    # object's cell (in cell order the next cell is enough), the lookup that cell and side
    # questions need (docs/quickstart.md).
    config = ShapesWorldConfig(seed=seed, num_train=num_train, num_test=num_test, image_size=IMAGE_SIZE,
                               single_turn=True, caption_order="random")
    manifest = data / "manifest.json"
    made = json.loads(manifest.read_text()).get("config", {}) if manifest.is_file() else {}
    if made == json.loads(json.dumps(asdict(config))):  # the same generator settings: same bytes
        print(f"==> data: reusing {data}")
        return
    print(f"==> data: generating the shapes world into {data}")
    generate_shapes_world(config, data)


def _stage_overrides(stage: str, out: Path, data: Path, router: str, seed: int, progress: bool) -> list[str]:
    d, o = str(data), str(out)
    common = [f"train.output_dir={o}/{stage}", f"train.seed={seed}", f"train.progress_bar={progress}"]
    if stage == "vision":
        return common + [f"clip.data={d}/pretrain.json", f"clip.image_folder={d}/images", f"clip.tokenizer={d}/tokenizer"]
    if stage == "lm":
        return common + [f"lm.data=[{d}/text.txt]", f"lm.tokenizer={d}/tokenizer",
                         f"lm.cache_dir={o}/cache"]
    paths = [f"vlm.image_folder={d}/images"]
    if stage == "pretrain":
        return common + paths + [f"vlm.data={d}/pretrain.json", f"vlm.tokenizer={d}/tokenizer",
                                 f"vlm.model.vision.name_or_path={o}/vision/final",
                                 f"vlm.model.language_model.name_or_path={o}/lm/final"]
    tuning = [f"vlm.data=[{d}/instruct_train.json,{d}/pretrain.json]", f"vlm.eval_data={d}/instruct_val.json"]
    if stage == "transition":  # Mixture of Tokens -> token-choice routing, briefly re-tuned
        return common + paths + tuning + [f"vlm.init_from={o}/finetune_moe/final", "vlm.moe=null",
                                          "vlm.mot_to_token_choice=smoe", f"train.max_steps={TRANSITION_STEPS}"]
    return common + paths + tuning + [f"vlm.init_from={o}/pretrain/final", f"vlm.moe.router={router}"]


def run_quickstart(out: Path, data: Path, recipes: Path, router: str, seed: int = 0, progress: bool = True,
                   num_train: int = NUM_TRAIN_IMAGES, num_test: int = NUM_TEST_IMAGES,
                   overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from llava_smoe.training import load_recipe
    from llava_smoe.training.trainer import train

    start = time.perf_counter()
    for stage in STAGES:
        if not (recipes / f"{stage}.yaml").is_file():
            raise FileNotFoundError(f"{recipes / f'{stage}.yaml'} not found: run from the repository root "
                                    "or pass --recipes")
    _synthesize(data, seed, num_train, num_test)
    seconds = {"data": round(time.perf_counter() - start, 1)}
    stages = STAGES + (("transition",) if router == "mot" else ())
    for stage in stages:
        t0 = time.perf_counter()
        recipe = recipes / f"{'finetune_moe' if stage == 'transition' else stage}.yaml"
        print(f"==> stage {stage}: {recipe}")
        run_config = load_recipe(recipe, _stage_overrides(stage, out, data, router, seed, progress) + list(overrides))
        result = train(run_config)
        if result.status != "completed":
            raise RuntimeError(f"stage {stage} did not complete: {result.message}")
        seconds[stage] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    checkpoint = out / stages[-1] / "final"
    summary = evaluate(checkpoint, data)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    summary.update(router=router, seconds=round(time.perf_counter() - start, 1), stage_seconds=seconds,
                   checkpoint=str(checkpoint), seed=seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate(checkpoint: Path, data: Path) -> dict:
    """Exact-match accuracy on the held-out test split, with the image and blind."""
    from llava_smoe.evaluation import evaluate_exact_match
    from llava_smoe.pretrained import load_pretrained

    model, processor = load_pretrained(checkpoint)
    records = json.loads((data / "instruct_test.json").read_text())
    images = str(data / "images")
    seen = evaluate_exact_match(model, processor, records, images, blind=False)
    blind = evaluate_exact_match(model, processor, records, images, blind=True)
    return {
        "accuracy": seen.accuracy,
        "blind_accuracy": blind.accuracy,
        "num_questions": seen.num_questions,
        "accuracy_by_type": seen.per_type,
        "blind_accuracy_by_type": blind.per_type,
    }


def print_summary(summary: dict) -> None:
    print()
    print("| router | accuracy | blind accuracy | questions | seconds |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {summary['router']} | {summary['accuracy']:.3f} | {summary['blind_accuracy']:.3f} "
          f"| {summary['num_questions']} | {summary['seconds']:.0f} |")
    print()
    for qtype, acc in sorted(summary["accuracy_by_type"].items()):
        print(f"  {qtype:<20} {acc:.3f}  (blind {summary['blind_accuracy_by_type'].get(qtype, float('nan')):.3f})")
    ckpt = summary["checkpoint"]
    print(f"\ncheckpoint: {ckpt}")
    print(f"chat with it:   llava-smoe chat {ckpt} --image playground/data/shapes/images/test/<file>.png")
    print(f"web demo:       llava-smoe web {ckpt}")
