"""`llava-smoe probe`: does a checkpoint read an attribute from the image? Teacher-forced word
accuracy of reference answers (captions, say), per group of words, with the image and blind.

    llava-smoe probe CKPT --data playground/data/shapes/captions_test.json --manifest playground/data/shapes/manifest.json
    llava-smoe probe CKPT --data captions.json --group color=red,blue,green --group size=small,large --out probe.json
"""

from __future__ import annotations

import argparse


def _group(value: str) -> tuple[str, list[str]]:
    name, _, words = value.partition("=")
    listed = [w.strip() for w in words.split(",") if w.strip()]
    if not name.strip() or not listed:
        raise argparse.ArgumentTypeError(f"expected NAME=word,word,... got {value!r}")
    return name.strip(), listed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (model + processor, from save_pretrained)")
    parser.add_argument("--data", required=True, help="LLaVA .json/.jsonl records whose answers are the references")
    parser.add_argument("--image-folder", help="images of --data (default: images/ next to it, else its folder)")
    parser.add_argument("--group", type=_group, action="append", default=[], metavar="NAME=WORD,...",
                        help="a group of words to score (repeatable)")
    parser.add_argument("--manifest", help="a shapes-world manifest.json: its colours and shapes as two groups")
    parser.add_argument("--limit", type=int, help="first N question/answer turns of --data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--out", help="write the result as JSON here as well")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from llava_smoe.evaluation.questions import load_questions
    from llava_smoe.evaluation.word_probe import probe_words
    from llava_smoe.pretrained import load_pretrained

    groups = dict(args.group)
    if args.manifest:
        with open(args.manifest) as f:
            manifest = json.load(f)
        if not {"colors", "shapes"} <= manifest.keys():
            raise SystemExit(f"error: {args.manifest} has no 'colors' and 'shapes' lists (not a shapes-world manifest)")
        groups = {"color": manifest["colors"], "shape": manifest["shapes"], **groups}
    if not groups:
        raise SystemExit("error: give --group NAME=WORD,... or --manifest")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1, got {args.limit}")
    items = load_questions(args.data, args.image_folder)[: args.limit]
    model, processor = load_pretrained(args.checkpoint, device=args.device)
    try:
        result = probe_words(model, processor, items, groups, batch_size=args.batch_size)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    text = json.dumps(result.to_dict(), indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"{result.num_items} references, token loss {result.token_loss:.4f} (blind {result.blind_token_loss:.4f})")
    for name, score in result.groups.items():
        if score.count:
            print(f"  {name}: {score.accuracy:.3f} (blind {score.blind_accuracy:.3f}) over {score.count} words")
        else:
            print(f"  {name}: no word of the group in the references")
    return 0
