"""The `llava_smoe` model for lmms-eval.

    lmms-eval --model llava_smoe --model_args pretrained=CKPT[,dtype=bfloat16,max_new_tokens=128] \\
        --tasks gqa --batch_size 8 --output_path runs/eval

The checkpoint's own processor decides the template, image token and preprocessing. Generation
requests are grouped by generation settings and run by the inference engine (continuous
batching, `batch_size` rows at a time); log-likelihood requests are sorted by length and scored
in padded batches.
Several processes (`accelerate launch -m lmms_eval ...`): lmms-eval hands each rank its share
of the requests; each process evaluates on its own device (data parallel, no model wrapping).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from llava_smoe.config import Config, invalid, parse
from llava_smoe.evaluation.generation import (
    InferenceRunner,
    Prompt,
    sampling_from_gen_kwargs,
    sorted_batches,
)
from llava_smoe.pretrained import DTypeChoice, load_pretrained, resolve_device
from llava_smoe.processing.templates import IMAGE_POSITIONS, with_placeholders


@dataclass
class ModelArgs(Config):
    """`--model_args` of the llava_smoe lmms-eval model.

    pretrained: the checkpoint folder (required unless a model object is given). device: cuda,
    cpu (default: cuda when present). dtype: "auto" = bf16 on a GPU that has it, else fp32.
    batch_size: rows decoded together (generation) or scored per forward (log-likelihoods).
    max_new_tokens: when a task sets none. attn_implementation:
    "sdpa", "eager", "flash_attention_2", "auto". max_batch_size: lmms-eval always passes it;
    batches are fixed-size here.
    """

    pretrained: str | None = None
    device: str | None = None
    dtype: DTypeChoice = "auto"
    batch_size: int | str = 1
    max_new_tokens: int = 64
    attn_implementation: str = "sdpa"
    max_batch_size: int | None = None

    def validate(self) -> None:
        if isinstance(self.batch_size, str):
            if self.batch_size.startswith("auto"):
                raise invalid("batch_size", "'auto' is not supported; give a number (e.g. --batch_size 8)")
            if not self.batch_size.isdigit():
                raise invalid("batch_size", f"expected an integer, got {self.batch_size!r}")
            self.batch_size = int(self.batch_size)
        if self.batch_size < 1:
            raise invalid("batch_size", f"must be >= 1, got {self.batch_size}")


class LlavaSmoeLmms(lmms):
    """lmms-eval model over a saved LLaVA-SMoE checkpoint (a folder from `save_pretrained`),
    configured by `ModelArgs`. The model object may also be given directly
    (`model=..., processor=...`) for in-process use.
    """

    def __init__(self, model: Any = None, processor: Any = None, **model_args: Any) -> None:
        super().__init__()
        args = parse(ModelArgs, model_args, ("model_args",))
        self.batch_size_per_device = args.batch_size
        self.max_new_tokens = args.max_new_tokens
        pretrained, device, dtype, attn_implementation = args.pretrained, args.device, args.dtype, args.attn_implementation

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._device = self.accelerator.device  # this process's GPU (or CPU under gloo)
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            self._device = resolve_device(device)

        if model is None:
            if not pretrained:
                raise ValueError("llava_smoe: pass --model_args pretrained=PATH (a folder written by save_pretrained)")
            model, processor = load_pretrained(str(pretrained), dtype=dtype, device=self._device,
                                               attn_implementation=attn_implementation)
        elif processor is None:
            raise ValueError("llava_smoe: a model object needs its processor (processor=...)")
        else:
            model = model.to(self._device).eval()
        self.pretrained = pretrained
        self.runner = InferenceRunner(model, processor)

    # -- properties lmms-eval reads -------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def processor(self) -> Any:
        return self.runner.processor

    @property
    def tokenizer(self) -> Any:
        return self.runner.processor.tokenizer

    @property
    def config(self) -> Any:
        return self.runner.model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # -- requests -----------------------------------------------------------------------------
    def _prompt(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Prompt:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images = []
        for v in _flatten(visuals):
            if not isinstance(v, Image.Image):
                raise TypeError(
                    f"llava_smoe takes images only; task {task!r} doc {doc_id} gave a {type(v).__name__} visual"
                )
            images.append(v.convert("RGB"))
        position = doc.get("image_position") if isinstance(doc, dict) else None
        placeholder = self.runner.processor.config.image_token
        if images and position in IMAGE_POSITIONS and placeholder not in context:
            # The record's own placement (the local tasks' parquet), not the processor's default.
            context = with_placeholders(context, placeholder, len(images), position)
        return Prompt(context, images)

    def _text_length(self, context: str) -> int:
        return len(self.tokenizer(context, add_special_tokens=False)["input_ids"])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same generation settings
        for i, a in enumerate(args):
            groups[json.dumps(a[1], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(args)
        pbar = tqdm(total=len(args), disable=self.rank != 0, desc="llava_smoe generate")
        for indices in groups.values():
            params = sampling_from_gen_kwargs(args[indices[0]][1], self.max_new_tokens)
            prompts = [self._prompt(args[i][0], *args[i][2:6]) for i in indices]
            for i, text in zip(indices, self.runner.generate(prompts, params, batch_size=self.batch_size)):
                results[i] = text
                self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
            pbar.update(len(indices))
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        continuations = []
        for context, target, _, doc_id, task, split in args:
            continuations.append(target if isinstance(target, str) else target(self.task_dict[task][split][doc_id]))
        results: list[tuple[float, bool] | None] = [None] * len(args)
        lengths = [self._text_length(a[0] + c) for a, c in zip(args, continuations)]
        pbar = tqdm(total=len(args), disable=self.rank != 0, desc="llava_smoe loglikelihood")
        for batch in sorted_batches(lengths, self.batch_size):
            prompts = [self._prompt(args[i][0], *args[i][2:6]) for i in batch]
            scored = self.runner.loglikelihood_batch(prompts, [continuations[i] for i in batch])
            for i, r in zip(batch, scored):
                results[i] = r
                self.cache_hook.add_partial("loglikelihood", (args[i][0], continuations[i]), r)
            pbar.update(len(batch))
        pbar.close()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "llava_smoe does not implement generate_until_multi_round (multi-round tasks such as "
            "mmsearch); run single-round generate_until or loglikelihood tasks"
        )


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]
