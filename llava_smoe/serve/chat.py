"""`llava-smoe chat`: talk to a checkpoint in the terminal, replies streamed as they are generated.

Commands: /image PATH (attach to the next message), /reset, /routing (experts used by the last
reply), /help, /quit. Works on a terminal or with messages piped into stdin.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TextIO

from llava_smoe.serve.config import add_engine_arguments, engine_config_from_args

HELP = "commands: /image PATH  /reset  /routing  /help  /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--image", default=None, help="image attached to the first message")
    parser.add_argument("--system", default=None, help="system prompt (default: the checkpoint's template default)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)


def chat_loop(engine, conversation, params, read: Callable[[str], str], out: TextIO) -> int:
    """Read messages and commands until /quit or end of input."""
    from llava_smoe.processing import load_image
    from llava_smoe.serve.conversation import routing_lines
    from llava_smoe.inference import RequestError

    out.write(f"{HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/quit":
                return 0
            if command == "/reset":
                conversation.reset()
                out.write("(conversation cleared)\n")
            elif command == "/image":
                try:
                    conversation.pending_images.append(load_image(arg.strip()))
                    out.write(f"(image {arg.strip()} attached to your next message)\n")
                except (OSError, ValueError) as e:
                    out.write(f"error: cannot open image {arg.strip()!r}: {e}\n")
            elif command == "/routing":
                out.write("\n".join(routing_lines(conversation.last)) + "\n")
            else:
                out.write(f"{HELP}\n")
            out.flush()
            continue
        out.write("assistant> ")
        out.flush()
        try:
            for delta in conversation.reply(engine, line, params):
                out.write(delta)
                out.flush()
            out.write("\n")
        except RequestError as e:
            out.write(f"\nerror: {e}\n")
        out.flush()


def run(args: argparse.Namespace) -> int:
    from llava_smoe.processing import load_image
    from llava_smoe.serve.conversation import Conversation
    from llava_smoe.inference import Engine, SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        conversation = Conversation(system=args.system)
        if args.image:
            conversation.pending_images.append(load_image(args.image))
        engine = Engine(engine_config_from_args(args))
    except (OSError, ValueError) as e:  # RequestError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - gives input() line editing and history
        except ImportError:
            pass
    try:
        return chat_loop(engine, conversation, params, input, sys.stdout)
    finally:
        engine.close()
