"""Every tiny stage end to end on the CPU, on the built-in shapes world or on your own data.

`llava-smoe quickstart` (what `scripts/quickstart.sh` runs) generates the shapes world, pretrains
the tiny language model on its text and the tiny vision tower contrastively on its captions
(CLIP's loss), pretrains the projector (and the LM) on the captions with the tower frozen,
upcycles the LM into MoE layers with the chosen router and instruction-tunes (a Mixture of
Tokens model is then converted to token-choice routing and briefly re-tuned), then answers the
held-out test questions twice: with the image, and with the image replaced by a blank one (the
answers must depend on the image). Results go to `OUT/summary.json`; the stage timings are
printed at the end.

With `--train FILE --test FILE --image-folder DIR` the same stages run on a LLaVA-format
dataset of yours: a byte-level BPE is trained on its text by the LM stage and used by every
stage; captions (`--captions`) are optional: without them each image's questions and answers,
joined, stand in for its caption (`--tower answers` pretrains the tower to answer the training
questions instead, `clip.objective: answers`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

STAGES = ("lm", "vision", "pretrain", "finetune_moe")
TRANSITION_STEPS = 150  # Mixture of Tokens only: token-choice re-tuning before evaluation
IMAGE_SIZE = 32  # the tiny tower sees 16 px patches: one per grid cell
NUM_TRAIN_IMAGES = 8000  # distinct layouts: fewer and the tiny model memorises scenes instead of learning cells
# ~2,000 test questions: the standard error of the accuracy is ~0.007 (~0.015 with the generator's
# default 200 images), small enough to compare routers on one run each.
NUM_TEST_IMAGES = 1000
AUGMENTS = ("none", "shift", "shift+flip")
# The answers objective on a few thousand questions: ~60 epochs of 128, where the contrastive
# tower's 500 steps are ~8 of the shapes world's 8,000 captions.
ANSWER_TOWER_STEPS = 1500


@dataclass
class PipelineData:
    """What the stages read. tokenizer None: the LM stage trains a BPE on `text` and every later
    stage uses it. text None: written from the captions and Q&A. captions None: each image's
    questions and answers, joined. tower_objective: the tower stage's `clip.objective`
    ("answers": it learns to answer the questions of `train`).
    augment: every image stage's training-time augmentation ("none", "shift", "shift+flip").
    image_position: where the Q&A records put the image ("first", "last"); stage 2's processor
    is told, so that evaluation and the front ends prompt as it was trained."""

    train: Path
    test: Path
    images: Path
    val: Path | None = None
    captions: Path | None = None
    tokenizer: Path | None = None
    text: Path | None = None
    image_size: int = IMAGE_SIZE
    patch_size: int = 16
    tower_objective: str = "contrastive"
    augment: str = "none"
    image_position: str = "first"


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
    own = parser.add_argument_group("your own data (instead of the shapes world)")
    own.add_argument("--train", help="LLaVA .json of training questions and answers (records with an image)")
    own.add_argument("--test", help="LLaVA .json of held-out questions the summary scores")
    own.add_argument("--val", help="LLaVA .json of validation questions (eval/loss during training)")
    own.add_argument("--captions", help="LLaVA .json of image captions (default: each image's Q&A, joined)")
    own.add_argument("--image-folder", help="the folder the records' image paths are relative to")
    own.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                     help=f"side the tower sees images at, a multiple of 16 (default: {IMAGE_SIZE})")
    own.add_argument("--tower", choices=("contrastive", "answers"), default="contrastive",
                     help="how the tower is pretrained: contrastively on the captions, or to answer the "
                          f"training questions ({ANSWER_TOWER_STEPS} steps; for data without captions)")
    own.add_argument("--augment", choices=AUGMENTS, default="none",
                     help="training-time image augmentation in every image stage: random shifts of up to 1/8 "
                          "of the side, and mirroring; only for data whose text never says where things are "
                          "(default: none)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from llava_smoe.config import ConfigError

    own = [args.train, args.test, args.image_folder]
    if any(own) and not all(own):
        raise ConfigError("your own data needs --train, --test and --image-folder together")
    if args.augment != "none" and not args.train:
        raise ConfigError("applies to your own data (--train): the shapes world's questions ask where things are",
                          ("--augment",))
    if args.tower != "contrastive" and not args.train:
        raise ConfigError("applies to your own data (--train)", ("--tower",))
    data = None
    if args.train:
        data = PipelineData(train=Path(args.train), test=Path(args.test), images=Path(args.image_folder),
                            val=Path(args.val) if args.val else None,
                            captions=Path(args.captions) if args.captions else None, image_size=args.image_size,
                            tower_objective=args.tower, augment=args.augment)
    try:
        summary = run_quickstart(Path(args.out), Path(args.data), Path(args.recipes), args.router, args.seed,
                                 progress=not args.no_progress, num_train=args.num_train, overrides=args.overrides,
                                 own_data=data)
    except StageIncomplete as exc:  # stopped by a signal or a non-finite loss: said in one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def _synthesize(data: Path, seed: int, num_train: int, num_test: int) -> PipelineData:
    from llava_smoe.data import ShapesWorldConfig, generate_shapes_world

    # Captions name the objects in random order: each "in the <cell>" is then a lookup of the named
    # object's cell (in cell order the next cell is enough), the lookup that cell and side
    # questions need (docs/quickstart.md). The image follows each question: the answer is then a
    # fixed few tokens after each cell's token, which a tiny LM finds by that distance.
    config = ShapesWorldConfig(seed=seed, num_train=num_train, num_test=num_test, image_size=IMAGE_SIZE,
                               single_turn=True, caption_order="random", image_position="last")
    manifest = data / "manifest.json"
    made = json.loads(manifest.read_text()).get("config", {}) if manifest.is_file() else {}
    if made == json.loads(json.dumps(asdict(config))):  # the same generator settings: same bytes
        print(f"==> data: reusing {data}")
    else:
        print(f"==> data: generating the shapes world into {data}")
        generate_shapes_world(config, data)
    return PipelineData(train=data / "instruct_train.json", test=data / "instruct_test.json", images=data / "images",
                        val=data / "instruct_val.json", captions=data / "pretrain.json",
                        tokenizer=data / "tokenizer", text=data / "text.txt", image_position=config.image_position)


def _prepare(data: PipelineData, out: Path) -> PipelineData:
    """Write what your own data lacks into OUT/data: the captions and the LM's text."""
    from llava_smoe.data.records import load_records

    for name, path in (("--train", data.train), ("--test", data.test), ("--val", data.val),
                       ("--captions", data.captions)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
    if not data.images.is_dir():
        raise FileNotFoundError(f"--image-folder {data.images} is not a folder")
    if data.image_size % data.patch_size:
        from llava_smoe.config import ConfigError

        raise ConfigError(f"{data.image_size} must be a multiple of the tower's {data.patch_size} px patches",
                          ("--image-size",))
    prepared = out / "data"
    prepared.mkdir(parents=True, exist_ok=True)
    records = [r for r in load_records(str(data.train)) if isinstance(r, dict)]
    data.image_position = _image_position(records)
    if data.captions is None:
        by_image: dict[str, list[str]] = defaultdict(list)
        for r in records:
            turns = r.get("conversations") or []
            if r.get("image"):
                by_image[r["image"]] += [f"{q['value'].replace('<image>', '').strip()} {a['value'].strip()}"
                                         for q, a in zip(turns[::2], turns[1::2])]
        if not by_image:
            raise FileNotFoundError(f"--train {data.train} has no record with an image to make captions from")
        captions = [{"id": f"caption-{i:06d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": ". ".join(qa)}]}
            for i, (image, qa) in enumerate(sorted(by_image.items()))]
        data.captions = prepared / "captions.json"
        data.captions.write_text(json.dumps(captions, indent=1))
    if data.text is None:
        lines = []
        for r in [*records, *load_records(str(data.captions))]:
            turns = r.get("conversations") or []
            lines += [f"{q['value'].replace('<image>', '').strip()} {a['value'].strip()}"
                      for q, a in zip(turns[::2], turns[1::2])]
        data.text = prepared / "text.txt"
        data.text.write_text("\n".join(lines) + "\n")
    return data


def _image_position(records: list[dict]) -> str:
    """Where the training questions put the image (the more common of first and last; first on a
    tie): stage 2's processor is told, so that the front ends place an image as training did."""
    from llava_smoe.processing.templates import placement_of
    from llava_smoe.processing.tokenizer import DEFAULT_IMAGE_TOKEN

    counts: Counter = Counter()
    for r in records:
        question = next((t.get("value", "") for t in r.get("conversations") or [] if t.get("from") == "human"), None)
        if r.get("image") and question is not None:
            counts[placement_of(question, DEFAULT_IMAGE_TOKEN) or "unplaced"] += 1
    position = "last" if counts["last"] > counts["first"] else "first"
    print(f"==> data: the training questions put the image first in {counts['first']:,}, last in {counts['last']:,}, "
          f"inside the text in {counts['inside']:,}, nowhere in {counts['unplaced']:,}: "
          f"stage 2 places an image the text does not place {position}")
    return position


def _augment_overrides(task: str, data: PipelineData) -> list[str]:
    if data.augment == "none":
        return []
    return [f"{task}.augment.shift={data.image_size // 8}", f"{task}.augment.hflip={data.augment == 'shift+flip'}"]


def _stage_overrides(stage: str, out: Path, data: PipelineData, router: str, seed: int, progress: bool) -> list[str]:
    o = str(out)
    tokenizer = str(data.tokenizer or out / "lm" / "final")
    common = [f"train.output_dir={o}/{stage}", f"train.seed={seed}", f"train.progress_bar={progress}"]
    if stage == "lm":
        return common + [f"lm.data=[{data.text}]", f"lm.tokenizer={data.tokenizer or 'null'}", f"lm.cache_dir={o}/cache"]
    if stage == "vision":
        tower = [f"clip.image_folder={data.images}", f"clip.tokenizer={tokenizer}",
                 f"clip.model.vision_config.image_size={data.image_size}",
                 f"clip.model.vision_config.patch_size={data.patch_size}",
                 *_augment_overrides("clip", data)]
        if data.tower_objective == "answers":  # text-only training records are counted and skipped
            return common + tower + [f"clip.data={data.train}", "clip.objective=answers", "clip.on_bad_sample=skip",
                                     f"train.max_steps={ANSWER_TOWER_STEPS}"]
        return common + tower + [f"clip.data={data.captions}"]
    paths = [f"vlm.image_folder={data.images}", *_augment_overrides("vlm", data)]
    if stage == "pretrain":
        return common + paths + [f"vlm.data={data.captions}", f"vlm.tokenizer={tokenizer}",
                                 f"vlm.model.vision.name_or_path={o}/vision/final",
                                 f"vlm.model.language_model.name_or_path={o}/lm/final"]
    tuning = [f"vlm.data=[{data.train},{data.captions}]", f"vlm.eval_data={data.val or 'null'}",
              f"vlm.image_position={data.image_position}"]
    if stage == "transition":  # Mixture of Tokens -> token-choice routing, briefly re-tuned
        return common + paths + tuning + [f"vlm.init_from={o}/finetune_moe/final", "vlm.moe=null",
                                          "vlm.mot_to_token_choice=smoe", f"train.max_steps={TRANSITION_STEPS}"]
    return common + paths + tuning + [f"vlm.init_from={o}/pretrain/final", f"vlm.moe.router={router}"]


class StageIncomplete(RuntimeError):
    """A stage ended before its last step (a signal, a non-finite loss)."""


def run_quickstart(out: Path, data: Path, recipes: Path, router: str, seed: int = 0, progress: bool = True,
                   num_train: int = NUM_TRAIN_IMAGES, num_test: int = NUM_TEST_IMAGES,
                   overrides: list[str] | tuple[str, ...] = (), own_data: PipelineData | None = None) -> dict:
    from llava_smoe.training import load_recipe
    from llava_smoe.training.trainer import train

    start = time.perf_counter()
    for stage in STAGES:
        if not (recipes / f"{stage}.yaml").is_file():
            raise FileNotFoundError(f"{recipes / f'{stage}.yaml'} not found: run from the repository root "
                                    "or pass --recipes")
    pipeline = _prepare(own_data, out) if own_data is not None else _synthesize(data, seed, num_train, num_test)
    seconds = {"data": round(time.perf_counter() - start, 1)}
    stages = STAGES + (("transition",) if router == "mot" else ())
    for stage in stages:
        t0 = time.perf_counter()
        recipe = recipes / f"{'finetune_moe' if stage == 'transition' else stage}.yaml"
        print(f"==> stage {stage}: {recipe}")
        run_config = load_recipe(recipe, _stage_overrides(stage, out, pipeline, router, seed, progress) + list(overrides))
        result = train(run_config)
        if result.status != "completed":
            raise StageIncomplete(f"stage {stage} did not complete: {result.message}")
        seconds[stage] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    checkpoint = out / stages[-1] / "final"
    summary = evaluate(checkpoint, pipeline.test, pipeline.images)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    summary.update(router=router, seconds=round(time.perf_counter() - start, 1), stage_seconds=seconds,
                   checkpoint=str(checkpoint), seed=seed, test=str(pipeline.test))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate(checkpoint: Path, test: Path, images: Path) -> dict:
    """Exact-match accuracy on the held-out test questions, with the image and blind."""
    from llava_smoe.evaluation import evaluate_exact_match
    from llava_smoe.pretrained import load_pretrained

    model, processor = load_pretrained(checkpoint)
    records = json.loads(test.read_text())
    seen = evaluate_exact_match(model, processor, records, str(images), blind=False)
    blind = evaluate_exact_match(model, processor, records, str(images), blind=True)
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
    print("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items())
          + f"; {summary['seconds']:.0f} in all")
    ckpt = summary["checkpoint"]
    print(f"\ncheckpoint: {ckpt}")
    print(f"chat with it:   llava-smoe chat {ckpt} --image <an image of the test set>")
    print(f"web demo:       llava-smoe web {ckpt}")
