"""`llava-smoe export CKPT --format hf-llava --out DIR`: a folder transformers, vLLM and SGLang load."""

from __future__ import annotations

import argparse
import sys

from llava_smoe.pretrained import DTYPES

FORMATS = ("hf-llava",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="folder written by save_pretrained (model + processor)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf-llava: transformers' LlavaForConditionalGeneration + LlavaProcessor")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"],
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--allow-tokenization-drift", action="store_true",
                        help="export even when transformers tokenises prompts differently from this checkpoint's "
                             "processor (templates whose segments meet at plain text, e.g. vicuna_v1)")


def run(args: argparse.Namespace) -> int:
    from llava_smoe.convert.hf_llava import ConversionError, export_hf_llava
    from llava_smoe.pretrained import load_pretrained

    model, processor = load_pretrained(args.checkpoint, dtype=args.dtype, device="cpu")
    try:
        out = export_hf_llava(model, processor, args.out, allow_tokenization_drift=args.allow_tokenization_drift)
    except ConversionError as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: transformers.LlavaForConditionalGeneration + AutoProcessor load it as it is")
    return 0
