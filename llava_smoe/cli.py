"""The `llava-smoe` command: one thin sub-command per job; the library does the work.

Each sub-command lives in a module exposing `add_arguments(parser)` and `run(args)`; modules
are imported only when needed so `llava-smoe --help` stays fast. A bad recipe, a bad record or
a missing file ends the command with one line naming it (`error: ...`) and exit status 2;
LLAVA_SMOE_TRACEBACK=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("llava_smoe.quickstart", "the whole pipeline on the built-in synthetic task: data, every tiny stage, evaluation"),
    "bench": ("llava_smoe.bench.cli", "benchmark MoE layers, the sample cache and fused AdamW against their baselines"),
    "plan": ("llava_smoe.plan.cli", "memory per GPU (no ZeRO, ZeRO-2, ZeRO-3), activations and FLOPs of a recipe, without weights"),
    "train": ("llava_smoe.training.cli", "train from a YAML recipe with dotted overrides (torch or DeepSpeed back end)"),
    "data": ("llava_smoe.data.cli", "generate the synthetic shapes world or a 665K-shaped dataset; check a LLaVA dataset"),
    "eval": ("llava_smoe.evaluation.eval_cli", "evaluate checkpoints with lmms-eval (benchmarks and local tasks), side by side"),
    "inspect": ("llava_smoe.evaluation.inspect_cli", "routing analysis: expert load by modality, entropy, dead experts, competition agreement"),
    "probe": ("llava_smoe.evaluation.probe_cli", "teacher-forced word accuracy of captions per word group (colour, shape), with the image and blind"),
    "study": ("llava_smoe.study.cli", "compare routers over seeds: run a study's cells, then intervals and paired tests"),
    "compare": ("llava_smoe.evaluation.compare_cli", "compare training runs: a markdown table and plots from their metrics.jsonl"),
    "chat": ("llava_smoe.serve.chat", "chat with a checkpoint in the terminal (streaming; /image, /reset, /quit)"),
    "web": ("llava_smoe.serve.web", "serve a checkpoint as a Gradio chat page with image upload and expert routing"),
    "serve": ("llava_smoe.serve.api", "serve a checkpoint over an OpenAI-compatible HTTP API (chat completions)"),
    "export": ("llava_smoe.convert.export_cli", "write a checkpoint in the transformers LLaVA format (transformers, vLLM, SGLang)"),
    "import": ("llava_smoe.convert.import_cli", "turn a transformers LLaVA checkpoint (e.g. llava-1.5-7b-hf) into a llava-smoe one"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-smoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module_name).add_arguments(sp)
        sp.set_defaults(_module=module_name)
    return parser


def _is_input_error(exc: BaseException) -> bool:
    """Errors about what the user gave (recipe, data, paths), as opposed to bugs."""
    from llava_smoe.config import ConfigError

    kinds: list[type] = [ConfigError, FileNotFoundError, NotADirectoryError]
    for module, name in (("llava_smoe.data.records", "BadSampleError"),
                         ("llava_smoe.processing.templates", "ConversationError")):
        if module in sys.modules:  # raised from there only if it was imported
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(exc, tuple(kinds))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen sub-command's module (argument parsing needs nothing else).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from llava_smoe import allocator

    try:
        allocator.configure()  # large CPU buffers reused, not page-faulted in afresh every step
        result = importlib.import_module(args._module).run(args)
    except Exception as exc:
        if not _is_input_error(exc) or os.environ.get("LLAVA_SMOE_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
