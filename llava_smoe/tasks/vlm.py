"""`vlm`: the multimodal stages (projector pretraining, instruction tuning, MoE upcycling).

Recipe section `vlm:` (see `VLMTaskConfig`). A stage either assembles a model (`model:`, a
`VLMConfig`, plus `tokenizer:` and `template:` for the processor) or starts from the previous
stage's exported checkpoint (`init_from:`), optionally upcycling its dense FFNs into MoE layers
(`moe:` + `moe_placement:`). Which parts train is the recipe's `optim.groups` (parameters
matching no group are frozen), within what the model leaves trainable: a tower frozen by
`vision.freeze` (or `vision_freeze`) stays frozen. The final model and its processor are
written to `OUTPUT_DIR/final`, the input of the next stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from llava_smoe.config import Config, ConfigError, invalid
from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
from llava_smoe.data.augment import AugmentConfig, augment_in_training
from llava_smoe.model.configuration import MoEPlacement, VLMConfig
from llava_smoe.moe import MoEConfig
from llava_smoe.processing.images import ImageMode
from llava_smoe.training.tasks import TaskParts, count_supervised_tokens, register_task

log = logging.getLogger(__name__)


@dataclass
class VLMTaskConfig(Config):
    """data / eval_data: LLaVA JSON or JSONL (data may list several, concatenated); image paths
        are relative to image_folder.
    model: how to assemble a new model - or init_from: a previous stage's `final`.
    tokenizer: the tokenizer folder for a new assembly (its processor is built here).
    template / system_prompt: the conversation format (default vicuna_v1 for a new assembly;
        a checkpoint keeps its own unless a template is given, e.g. 'plain' captioning in
        stage 1, then a chat template for instruction tuning).
    image_position: where the processor puts a message's images when its text does not place
        them ('first' or 'last'; null: the checkpoint's, 'first' for a new assembly). Saved with
        the checkpoint, so evaluation and every front end prompt as the data trained it.
    image_mode: how a new assembly's processor fits images to the tower ('pad' to a square in
        the mean colour, as LLaVA-1.5; 'resize'; 'center_crop'); mean and std are the tower's.
    moe / moe_placement: upcycle the loaded model's dense FFNs into MoE layers.
    widen_ffn: widen the loaded model's dense LM FFNs to this many times their width, keeping
        their function (new units start with a zero output): the dense model as wide as an
        upcycled MoE's active experts (k x F), from the same checkpoint.
    vision_freeze: freeze (true) or unfreeze (false) the vision tower's dense weights, overriding
        the model's `vision.freeze` (e.g. to tune a checkpoint's frozen tower); null keeps it.
        `optim.groups` never train a frozen tower.
    mot_to_token_choice: convert the loaded model's Mixture-of-Tokens layers to this token-choice
        router (e.g. smoe) for "transition tuning", so inference never mixes requests.
    on_bad_sample: "error" stops at the first bad record; "skip" drops and counts them.
    cache_samples: keep built samples (tokens, preprocessed images) in memory after their first
        use, for data that fits in RAM (the shapes world); later epochs skip decoding.
    augment: training-time image augmentation (random shifts, mirroring; llava_smoe.data.augment),
        off by default: it changes what an image says about where things are.
    eval_accuracy: at every evaluation also answer eval_data's questions greedily and score them
        by exact match (`eval/accuracy`, and `eval/accuracy/<type>` per question type), so that a
        study can compare accuracy at equal wall-clock, not only at the end.
    """

    data: str | list[str]
    image_folder: str | None = None
    eval_data: str | None = None
    max_length: int = 2048
    on_bad_sample: str = "error"
    model: VLMConfig | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    image_position: str | None = None
    image_mode: ImageMode = "pad"
    moe: MoEConfig | None = None
    moe_placement: MoEPlacement = field(default_factory=MoEPlacement)
    widen_ffn: int | None = None
    mot_to_token_choice: str | None = None
    vision_freeze: bool | None = None
    cache_samples: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_accuracy: bool = False

    def validate(self) -> None:
        from llava_smoe.processing.templates import IMAGE_POSITIONS

        if self.image_position is not None and self.image_position not in IMAGE_POSITIONS:
            raise invalid("image_position", f"must be one of {list(IMAGE_POSITIONS)} or null, got {self.image_position!r}")
        if self.eval_accuracy and self.eval_data is None:
            raise invalid("eval_accuracy", "scores eval_data's questions: set `eval_data`")
        if (self.model is None) == (self.init_from is None):
            raise invalid("model", "give exactly one of `model` (assemble a new model) or `init_from` "
                                   "(a previous stage's exported checkpoint folder)")
        if self.model is not None and self.tokenizer is None:
            raise invalid("tokenizer", "a new assembly needs a tokenizer folder")
        if self.widen_ffn is not None:
            if self.init_from is None:
                raise invalid("widen_ffn", "widens a checkpoint's FFNs: needs `init_from` (a new assembly "
                                           "sets its LM's intermediate_size instead)")
            if self.moe is not None:
                raise invalid("widen_ffn", "widens dense FFNs: drop it or `moe`, not both")
            if self.widen_ffn < 2:
                raise invalid("widen_ffn", f"a factor of at least 2 (got {self.widen_ffn})")


def assemble(config: VLMTaskConfig):
    """(model, processor) for a stage: built anew or loaded and optionally upcycled."""
    from llava_smoe.pretrained import load_pretrained

    if config.init_from is not None:
        if not Path(config.init_from).is_dir():
            raise ConfigError(f"{config.init_from} is not a folder (run the previous stage first)", ("init_from",))
        model, processor = load_pretrained(config.init_from)
        model.train()
        changes = {} if config.template is None else {"template": config.template, "system_prompt": config.system_prompt}
        if config.image_position is not None:
            changes["image_position"] = config.image_position
        if changes:
            from llava_smoe.processing import LlavaSmoeProcessor

            processor = LlavaSmoeProcessor(processor.tokenizer, replace(processor.config, **changes))
            if len(processor.tokenizer) != model.config.text_config.vocab_size:
                raise ConfigError(f"{config.template!r} adds tokens the checkpoint's model lacks; use a tokenizer "
                                  "that already holds the template's control tokens", ("template",))
        apply_checkpoint_stage(model, config)
        return model, processor
    return _assemble_new(config)


def apply_checkpoint_stage(model, config: VLMTaskConfig) -> None:
    """What a stage starting from a checkpoint changes in its model: MoE upcycling, FFN widening
    and the Mixture-of-Tokens conversion (the tower's freeze is `build_vlm`'s, for every stage)."""
    from llava_smoe.model import surgery

    if config.moe is not None:
        placement = config.moe_placement
        surgery.upcycle(model, config.moe, placement.language_model, placement.vision_tower)
    if config.widen_ffn is not None:
        try:
            surgery.widen_lm_ffns(model, config.widen_ffn)
        except ValueError as err:
            raise ConfigError(f"{config.init_from}: {err}", ("widen_ffn",)) from None
    if config.mot_to_token_choice is not None:
        from llava_smoe.moe import convert_mot_to_token_choice

        if not convert_mot_to_token_choice(model, router=config.mot_to_token_choice):
            raise ConfigError(f"{config.init_from} has no Mixture-of-Tokens layer", ("mot_to_token_choice",))
        surgery.record_moe(model)


def new_model_spec(config: VLMTaskConfig, tokenizer_size: int | None, image_token_id: int) -> VLMConfig:
    """The `VLMConfig` a new assembly builds: the recipe's model, its embeddings grown to the
    tokenizer (when `tokenizer_size` is known), the image token's id and the stage's MoE."""
    spec = config.model
    changes = {}
    if tokenizer_size is not None and spec.vocab_size is None and _lm_vocab_size(spec) < tokenizer_size:
        changes["vocab_size"] = tokenizer_size  # grow only: some LMs pad their vocabulary past the tokenizer
    if spec.image_token_id is None:
        changes["image_token_id"] = image_token_id
    if config.moe is not None and spec.moe is None:
        changes.update(moe=config.moe, moe_placement=config.moe_placement)
    return replace(spec, **changes)


def _assemble_new(config: VLMTaskConfig):
    from transformers import AutoTokenizer

    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
    )

    if not Path(config.tokenizer).is_dir():
        raise ConfigError(f"{config.tokenizer} is not a folder", ("tokenizer",))
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    # A first processor adds the image token and the template's control tokens to the tokenizer;
    # the model is then sized to it, and the final processor takes the tower's preprocessing.
    template = config.template or "vicuna_v1"
    probe = LlavaSmoeProcessor(tokenizer, ProcessorConfig(template=template, system_prompt=config.system_prompt,
                                                          num_image_tokens=1))
    try:
        model = new_model_spec(config, len(tokenizer), probe.image_token_id).build()
    except ConfigError as exc:
        raise exc.within("model") from None
    tower = model.vision_tower
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template=template, system_prompt=config.system_prompt, num_image_tokens=tower.num_image_tokens,
        image_position=config.image_position or "first",
        image=ImageProcessingConfig(image_size=tower.image_size, mean=tower.image_mean, std=tower.image_std,
                                    mode=config.image_mode),
    ))
    return model, processor


def _lm_vocab_size(spec: VLMConfig) -> int:
    lm = spec.language_model
    if lm.name_or_path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(lm.name_or_path).vocab_size
    return int(lm.resolved_config().get("vocab_size", 0))


def export(processor):
    def export_fn(model: torch.nn.Module, out_dir: Path) -> None:
        from llava_smoe.pretrained import save_pretrained

        save_pretrained(model, processor, out_dir)

    return export_fn


@register_task("vlm", VLMTaskConfig)
def build_vlm(config: VLMTaskConfig, run) -> TaskParts:
    model, processor = assemble(config)
    if config.vision_freeze is not None:
        model.set_vision_freeze(config.vision_freeze)
    augment_in_training(model, config.augment)

    def dataset(path: str) -> LlavaDataset:
        return LlavaDataset(DataConfig(path, config.image_folder, config.max_length, config.on_bad_sample,
                                       cache=config.cache_samples), processor)

    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    parts = [dataset(path) for path in paths]
    for path, part in zip(paths, parts):
        if part.skip_stats.total:
            log.warning("vlm: skipped %d records of %s: %s", part.skip_stats.total, path, part.skip_stats.as_dict())
    return TaskParts(
        model=model,
        train_dataset=parts[0] if len(parts) == 1 else ConcatDataset(parts),
        eval_dataset=dataset(config.eval_data) if config.eval_data else None,
        collate_fn=DataCollator.from_processor(processor),
        export_fn=export(processor),
        count_loss_items=count_supervised_tokens,
        evaluate_fn=exact_match_eval(config, processor) if config.eval_accuracy else None,
    )


def exact_match_eval(config: VLMTaskConfig, processor):
    """The model's greedy exact-match accuracy on eval_data: overall and per question type."""
    from llava_smoe.data.records import load_records
    from llava_smoe.evaluation.exact_match import evaluate_exact_match

    records = load_records(config.eval_data)

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate_exact_match(model, processor, records, config.image_folder)
        return {"eval/accuracy": result.accuracy, **{f"eval/accuracy/{t}": v for t, v in result.per_type.items()}}

    return evaluate_fn
