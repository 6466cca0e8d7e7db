"""`llava-smoe data`: generate the shapes world or a dataset shaped like LLaVA-1.5's 665K mix; check a LLaVA dataset against a processor."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write the synthetic shapes-world dataset and its tokenizer")
    synth.add_argument("--out", required=True, help="output folder, e.g. playground/data/shapes")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-train", type=int, default=2000)
    synth.add_argument("--num-val", type=int, default=200)
    synth.add_argument("--num-test", type=int, default=200)
    synth.add_argument("--num-heldout", type=int, default=100, help="images with held-out colour/shape pairs")
    synth.add_argument("--hard", action="store_true",
                       help="the harder world: 3x3 grid, 6 colours, 5 shapes, up to 5 objects, 48 px, counting by "
                            "attribute and neighbour questions (its own image size, shape count and question types)")
    synth.add_argument("--image-size", type=int, default=None, help="default: 32 (48 with --hard)")
    synth.add_argument("--max-shapes", type=int, default=None, help="default: 3 (5 with --hard)")
    synth.add_argument("--max-turns", type=int, default=3, help="questions per image")
    synth.add_argument("--single-turn", action="store_true",
                       help="one record per question (the image before each) instead of one per image")
    synth.add_argument("--vocab-size", type=int, default=512)
    synth.add_argument("--caption-order", choices=("cells", "random"), default="cells",
                       help="order of the objects in captions (default: cells, row by row)")
    synth.add_argument("--side-options", choices=("fixed", "random"), default="fixed",
                       help="order of the two answers a side question offers (default: fixed, left/top first)")
    synth.add_argument("--image-position", choices=("first", "last"), default="first",
                       help="the image before each question (default, as in LLaVA's data) or after it")
    synth.add_argument("--question-types", default=None,
                       help="comma-separated subset of count,color_of_shape,shape_of_color,shape_at,color_at,"
                            "exists,side (default: all but exists), with --hard count_color,count_shape,"
                            "shape_next_to,color_next_to, and lookup (knowledge questions)")
    synth.add_argument("--lookup", action="store_true",
                       help="add knowledge questions (lookup: the value of a made-up property of an object, from "
                            "a table drawn from the seed), as the shapes-lookup study does")
    synth.add_argument("--lookup-properties", type=int, default=None,
                       help="properties in the table (facts: properties x colours x shapes; default: 48)")
    synth.add_argument("--lookup-questions", type=int, default=None,
                       help="lookup questions among each image's candidates (default: 4 with --lookup, else 1)")

    world = sub.add_parser("world", help="write a held-out world (data the tiny recipes were not tuned on)")
    world.add_argument("name", choices=("single", "scatter"),
                       help="single: one shape per 64 px image, mostly yes/no questions; scatter: 2-4 shapes, 48 px")
    world.add_argument("--out", required=True)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--num-train", type=int, default=3000, help="training images (one question each)")
    world.add_argument("--num-val", type=int, default=200)
    world.add_argument("--num-test", type=int, default=500)
    mix = sub.add_parser("mix665k", help="write a synthetic dataset shaped like LLaVA-1.5's 665K mix (random words, "
                                         "noise images, real lengths) and its tokenizer")
    mix.add_argument("--out", required=True, help="output folder, e.g. playground/data/mix665k_synth")
    mix.add_argument("--num-records", type=int, default=1000)
    mix.add_argument("--num-images", type=int, default=16)
    mix.add_argument("--seed", type=int, default=0)
    mix.add_argument("--vocab-size", type=int, default=2048)
    mix.add_argument("--max-words", type=int, default=None, help="cut records to whole turns within this many words")

    check = sub.add_parser("check", help="build every sample once and report bad ones")
    check.add_argument("--data", required=True, help="LLaVA .json or .jsonl file")
    check.add_argument("--image-folder", default=None)
    check.add_argument("--processor", required=True, help="folder written by LlavaSmoeProcessor.save_pretrained")
    check.add_argument("--max-length", type=int, default=2048)
    check.add_argument("--on-bad-sample", choices=("error", "skip"), default="skip")


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data_command == "synth":
        from llava_smoe.data.synth import (
            ShapesWorldConfig,
            generate_shapes_world,
            world_settings,
        )

        # --lookup goes on top of the world chosen (--hard or not); the size flags over either.
        world = world_settings([name for name, on in (("hard", args.hard), ("lookup", args.lookup)) if on])
        for key in ("image_size", "max_shapes"):
            if getattr(args, key) is not None:
                world[key] = getattr(args, key)
        for key in ("lookup_properties", "lookup_questions"):
            if getattr(args, key) is not None:
                world[key] = getattr(args, key)
        if args.question_types:
            world["question_types"] = args.question_types.split(",")
        config = ShapesWorldConfig(
            seed=args.seed, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
            num_heldout=args.num_heldout, max_turns=args.max_turns, single_turn=args.single_turn,
            vocab_size=args.vocab_size, caption_order=args.caption_order, side_options=args.side_options,
            image_position=args.image_position, **world,
        )
        manifest = generate_shapes_world(config, args.out)
        print(json.dumps(manifest["counts"], indent=1))
        return 0

    if args.data_command == "world":
        from llava_smoe.data.worlds import WorldConfig, generate_world

        manifest = generate_world(WorldConfig(world=args.name, seed=args.seed, num_train=args.num_train,
                                              num_val=args.num_val, num_test=args.num_test), args.out)
        print(json.dumps(manifest["counts"], indent=1))
        return 0

    if args.data_command == "mix665k":
        from llava_smoe.data.mix665k import Mix665kConfig, generate_mix665k

        manifest = generate_mix665k(Mix665kConfig(num_records=args.num_records, num_images=args.num_images,
                                                  seed=args.seed, vocab_size=args.vocab_size,
                                                  max_words=args.max_words), args.out)
        print(json.dumps({k: manifest[k] for k in ("records", "by_source", "text_only", "words_per_record")}, indent=1))
        return 0

    from llava_smoe.data.dataset import DataConfig, LlavaDataset
    from llava_smoe.processing.processor import LlavaSmoeProcessor

    processor = LlavaSmoeProcessor.from_pretrained(args.processor)
    dataset = LlavaDataset(
        DataConfig(args.data, args.image_folder, max_length=args.max_length, on_bad_sample=args.on_bad_sample),
        processor,
    )
    stats = dataset.validate()
    print(json.dumps({"records": len(dataset.records), "usable": len(dataset) - (stats.total - dataset.skip_stats.total),
                      "skipped": stats.as_dict()}, indent=1))
    return 1 if stats.total else 0
