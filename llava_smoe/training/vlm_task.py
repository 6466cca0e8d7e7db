"""`vlm`: the multimodal stages (projector pretraining, instruction tuning, MoE upcycling).

Recipe section `vlm:` (see `VLMTaskConfig`). A stage either assembles a model (`model:`, a
`llava_smoe.model.build_model` dict, plus `tokenizer:` and `template:` for the processor) or
starts from the previous stage's exported checkpoint (`init_from:`), optionally upcycling its
dense FFNs into MoE layers (`moe:` + `moe_placement:`). Which parts train is the recipe's
`optim.groups` (parameters matching no group are frozen), within what the model leaves
trainable: a tower frozen by `vision.freeze` (or `vision_freeze`) stays frozen. The final model
and its processor are written to `OUTPUT_DIR/final`, the input of the next stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
from llava_smoe.training.config import ConfigError
from llava_smoe.training.tasks import TaskParts, register_task

log = logging.getLogger(__name__)


@dataclass
class VLMTaskConfig:
    """data / eval_data: LLaVA JSON or JSONL (data may list several, concatenated); image paths
        are relative to image_folder.
    model: a build_model dict (a fresh assembly) - or init_from: a previous stage's `final`.
    tokenizer: the tokenizer folder for a fresh assembly (its processor is built here).
    template / system_prompt: the conversation format (default vicuna_v1 for a fresh assembly;
        a checkpoint keeps its own unless a template is given, e.g. 'plain' captioning in
        stage 1, then a chat template for instruction tuning).
    moe / moe_placement: upcycle the loaded model's dense FFNs into MoE layers.
    vision_freeze: freeze (true) or unfreeze (false) the vision tower's dense weights, overriding
        the model's `vision.freeze` (e.g. to tune a checkpoint's frozen tower); null keeps it.
        `optim.groups` never train a frozen tower.
    mot_to_token_choice: convert the loaded model's Mixture-of-Tokens layers to this token-choice
        router (e.g. smoe) for "transition tuning", so inference never mixes requests.
    on_bad_sample: "error" stops at the first bad record; "skip" drops and counts them.
    cache_samples: keep built samples (tokens, preprocessed images) in memory after their first
        use, for data that fits in RAM (the shapes world); later epochs skip decoding.
    """

    data: str | list[str]
    image_folder: str | None = None
    eval_data: str | None = None
    max_length: int = 2048
    on_bad_sample: str = "error"
    model: dict[str, Any] | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    moe: dict[str, Any] | None = None
    moe_placement: dict[str, Any] = field(default_factory=dict)
    mot_to_token_choice: str | None = None
    vision_freeze: bool | None = None
    cache_samples: bool = False

    def __post_init__(self) -> None:
        if (self.model is None) == (self.init_from is None):
            raise ConfigError("vlm: give exactly one of `model` (assemble a new model) or `init_from` "
                              "(a previous stage's exported checkpoint folder)")
        if self.model is not None and self.tokenizer is None:
            raise ConfigError("vlm.tokenizer: a fresh assembly needs a tokenizer folder")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise ConfigError(f"vlm.init_from: {self.init_from} is not a folder (run the previous stage first)")


def assemble(config: VLMTaskConfig):
    """(model, processor) for a stage: built fresh or loaded and optionally upcycled."""
    from transformers import AutoTokenizer

    from llava_smoe.model import build_model, load_model
    from llava_smoe.moe import MoEConfig
    from llava_smoe.processing import ImageProcessingConfig, LlavaSmoeProcessor, ProcessorConfig

    if config.init_from is not None:
        model = load_model(config.init_from)
        processor = LlavaSmoeProcessor.from_pretrained(config.init_from)
        if config.template is not None:
            processor = LlavaSmoeProcessor(processor.tokenizer, replace(
                processor.config, template=config.template, system_prompt=config.system_prompt))
            if len(processor.tokenizer) != model.config.text_config.vocab_size:
                raise ConfigError(f"vlm.template={config.template!r} adds tokens the checkpoint's model lacks; "
                                  "use a tokenizer that already holds the template's control tokens")
            model.config.chat_template_name = config.template
        if config.moe is not None:
            model.apply_moe(MoEConfig.from_dict(config.moe), config.moe_placement or None)
        if config.mot_to_token_choice is not None:
            from llava_smoe.moe import convert_mot_to_token_choice, moe_layers

            if not convert_mot_to_token_choice(model, router=config.mot_to_token_choice):
                raise ConfigError(f"vlm.mot_to_token_choice: {config.init_from} has no Mixture-of-Tokens layer")
            model.config.moe_config = moe_layers(model)[0][1].config.to_dict()
        return model, processor

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    # A first processor adds the image token and the template's control tokens to the tokenizer;
    # the model is then sized to it, and the final processor takes the tower's preprocessing.
    template = config.template or "vicuna_v1"
    probe = LlavaSmoeProcessor(tokenizer, ProcessorConfig(template=template, system_prompt=config.system_prompt,
                                                          num_image_tokens=1))
    spec = dict(config.model)
    if "vocab_size" not in spec and _lm_vocab_size(spec.get("language_model", {})) < len(tokenizer):
        spec["vocab_size"] = len(tokenizer)  # grow only: some LMs pad their vocabulary past the tokenizer
    spec.setdefault("image_token_id", probe.image_token_id)
    spec.setdefault("chat_template_name", template)
    if config.moe is not None:
        spec.setdefault("moe", config.moe)
        if config.moe_placement:
            spec.setdefault("moe_placement", config.moe_placement)
    model = build_model(spec)
    c = model.config
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template=template, system_prompt=config.system_prompt, num_image_tokens=c.num_image_tokens,
        image=ImageProcessingConfig(image_size=c.image_size, mean=tuple(c.image_mean), std=tuple(c.image_std),
                                    mode={"pad": "pad", "resize": "resize", "crop": "center_crop"}[c.image_pad_mode]),
    ))
    return model, processor


def _lm_vocab_size(lm_spec: dict[str, Any]) -> int:
    if lm_spec.get("name_or_path"):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(lm_spec["name_or_path"]).vocab_size
    return int(lm_spec.get("config", {}).get("vocab_size", 0))


class VLMCollator:
    """The data collator, with the batch renamed to the model's arguments."""

    def __init__(self, processor) -> None:
        self.collate = DataCollator.from_processor(processor)

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        batch = self.collate(samples)
        images = batch.pop("images")
        batch.pop("has_image")  # images are given one row per image, in batch order
        if images.shape[0]:
            batch["pixel_values"] = images
        return batch


def export(processor):
    def export_fn(model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    return export_fn


@register_task("vlm", VLMTaskConfig)
def build_vlm(config: VLMTaskConfig, run) -> TaskParts:
    model, processor = assemble(config)
    if config.vision_freeze is not None:
        model.set_vision_freeze(config.vision_freeze)

    def dataset(path: str) -> LlavaDataset:
        return LlavaDataset(DataConfig(path, config.image_folder, config.max_length, config.on_bad_sample,
                                       cache=config.cache_samples), processor)

    parts = [dataset(path) for path in ([config.data] if isinstance(config.data, str) else config.data)]
    for path, part in zip(config.data if isinstance(config.data, list) else [config.data], parts):
        if part.skip_stats.total:
            log.warning("vlm: skipped %d records of %s: %s", part.skip_stats.total, path, part.skip_stats.as_dict())
    train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return TaskParts(
        model=model,
        train_dataset=train_set,
        eval_dataset=dataset(config.eval_data) if config.eval_data else None,
        collate_fn=VLMCollator(processor),
        export_fn=export(processor),
    )
