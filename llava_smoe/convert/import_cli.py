"""`llava-smoe import DIR --out CKPT`: a transformers LLaVA folder (e.g. llava-hf/llava-1.5-7b-hf)
as a llava-smoe checkpoint, processor included, ready for `init_from` and MoE upcycling."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of a transformers LlavaForConditionalGeneration checkpoint")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--template", default=None,
                        help="conversation template the weights were trained with, a llava-smoe template name "
                             "(default: recognised from the chat template; vicuna_v1 for LLaVA-1.5)")
    parser.add_argument("--system-prompt", default=None, help="system prompt (default: the template's)")


def run(args: argparse.Namespace) -> int:
    from llava_smoe.convert.hf_llava import ConversionError, import_hf_llava
    from llava_smoe.pretrained import save_pretrained

    try:
        model, processor = import_hf_llava(args.source, template=args.template, system_prompt=args.system_prompt)
    except ConversionError as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 2
    save_pretrained(model, processor, args.out)
    print(f"wrote {args.out} (template {processor.config.template}, {processor.num_image_tokens} tokens per image)")
    return 0
