"""What a study is: a recipe, variants of it, seeds, and the metric decided on before running.

    name: text-routers
    recipe: text.yaml                      # every cell trains this (a path relative to the spec)
    overrides: [train.max_steps=2000]      # for every cell; {seed}, {cell}, {shared}, {study} expand
    variants:                              # each a set of dotted overrides
      smoe: [lm.model.moe.router=smoe]
      dense: [lm.model.moe=null, lm.model.architecture.intermediate_size=512]
    seeds: [0, 1, 2]
    baseline: smoe
    primary: {name: eval/loss, goal: min}
    secondary: [train/loss]
    min_tokens: 2000000                    # a cell that trained on fewer tokens is an error
    shared:                                # optional: stages run once per seed, before its cells
      - {name: data, synth: {num_train: 8000}}          # the shapes world, generated with the seed
      - {name: stage1, recipe: ../tiny/pretrain.yaml, overrides: [...]}
    evaluate: {data: "{shared}/data/instruct_test.json", image_folder: "{shared}/data/images"}
    sweep: {key: optim.groups.0.lr, values: [2.5e-4, 5.0e-4, 1.0e-3]}  # optional: every variant at each

With a `sweep`, every variant runs at every value (cells `<variant>@<value>`, the value's override
after the variant's own), each is compared with the baseline at the same value, and the report
adds each variant at its best value: the same small sweep for every variant, so that none is
tuned more than another.

A spec may extend another in its folder (`extends: shapes-hard.yaml`): every key it sets
replaces the base's, except `overrides`, which come after the base's (the later setting wins),
and `shared`, whose stages replace the base's stage of the same name where it stands or run
after the base's, so a longer run of the same study restates nothing but what changes. A shared
stage `like: NAME` is the training stage of that name (the base's, or one listed before it) with
the stage's own overrides after its, and its max_loss unless the stage sets one:
`{name: stage1_wide, like: stage1, overrides: [...lm_wide/final]}`.

Placeholders: `{seed}`, `{cell}` (the cell's folder), `{study}` (the study's folder) and
`{shared}` (this seed's shared folder, whose stage `NAME` writes `{shared}/NAME`; a training
stage's checkpoint is `{shared}/NAME/final`); a synth stage's generator settings as `{NAME.FIELD}`
(`clip.model.vision_config.image_size={data.image_size}`), so a stage that must match the world
reads it from there instead of restating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llava_smoe.config import Config, ConfigError, invalid, parse

# Metrics a cell reports: from its training log, and from `evaluate` when the spec has it.
LOG_METRICS = ("eval/loss", "train/loss", "eval/accuracy")  # eval/accuracy: with vlm.eval_accuracy
EVAL_METRICS = ("accuracy", "blind_accuracy")  # and accuracy/<question type>
PLACEHOLDERS = ("seed", "study", "shared", "cell")  # plus each synth stage's name
LOSS_TAIL = 4  # logged values a shared stage's final loss is averaged over (max_loss)


@dataclass
class MetricSpec(Config):
    """The primary metric, declared before running; goal says which direction is better."""

    name: str
    goal: Literal["min", "max"] = "min"

    def validate(self) -> None:
        check_metric_name(self.name, "name")


def check_metric_name(name: str, key: str) -> None:
    if name not in LOG_METRICS + EVAL_METRICS and not name.startswith(("accuracy/", "eval/accuracy/")):
        raise invalid(key, f"{name!r} is not a metric a cell reports: {list(LOG_METRICS + EVAL_METRICS)}, "
                           "accuracy/<question type> or eval/accuracy/<question type>")


@dataclass
class StageSpec(Config):
    """A stage every cell of a seed starts from: a training recipe, or generating the shapes
    world (`synth`: ShapesWorldConfig fields, and `world: hard` or `lookup` or both for the
    settings of `llava-smoe data synth --hard` / `--lookup` under them; the study's seed is the
    generator's)."""

    name: str
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    synth: dict[str, Any] | None = None
    # A training stage must end at or below this loss (mean of its last LOSS_TAIL logged values),
    # or its seed's cells do not run: cells compared from a stalled stage compare the stall.
    max_loss: float | None = None

    def validate(self) -> None:
        if (self.recipe is None) == (self.synth is None):
            raise invalid("recipe", f"stage {self.name!r}: give exactly one of recipe or synth")
        if not self.name.isidentifier():
            raise invalid("name", f"{self.name!r} must be a plain identifier (it names a folder)")
        if self.synth is not None and self.name in PLACEHOLDERS:
            raise invalid("name", f"{self.name!r} is a placeholder of its own ({{{self.name}}}): a synth stage's "
                                  f"settings expand as {{NAME.FIELD}}, so name it otherwise")
        if self.max_loss is not None:
            if self.synth is not None:
                raise invalid("max_loss", f"stage {self.name!r} generates data: only a training stage has a loss")
            if not self.max_loss > 0:
                raise invalid("max_loss", f"must be > 0, got {self.max_loss}")


@dataclass
class EvaluationSpec(Config):
    """Exact-match accuracy of every cell's final checkpoint on held-out LLaVA-JSON questions,
    with the image and blind (a blank image in its place)."""

    data: str
    image_folder: str
    batch_size: int = 32


@dataclass
class SweepSpec(Config):
    """One setting every variant runs at each of `values` (e.g. the learning rate)."""

    key: str
    values: list[Any]

    def validate(self) -> None:
        if not self.key or "=" in self.key:
            raise invalid("key", f"a dotted config key, got {self.key!r}")
        if len(self.values) < 2:
            raise invalid("values", f"a sweep needs at least two values, got {self.values}")
        labels = self.labels
        if len(set(labels)) != len(labels):
            raise invalid("values", f"values must be distinct, got {labels}")
        for label in labels:
            if not label or "/" in label or label.startswith("."):
                raise invalid("values", f"{label!r} names folders: no '/', no leading '.'")
        # The report's "best at an end of the sweep" and its plot read the values in order.
        if self.ordered and self.values != sorted(self.values):
            raise invalid("values", f"list numbers in increasing order, got {labels}")

    @property
    def ordered(self) -> bool:
        """Whether the values are numbers (a learning rate), not names (a router): only then has
        the sweep ends that a best can lie at."""
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    @property
    def labels(self) -> list[str]:
        """Each value as written in overrides and cell names (floats as %g: 2.5e-4 -> 0.00025)."""
        return [f"{v:g}" if isinstance(v, float) else str(v) for v in self.values]


@dataclass
class StudySpec(Config):
    name: str
    recipe: str
    variants: dict[str, list[str]]
    seeds: list[int]
    baseline: str
    primary: MetricSpec
    secondary: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    shared: list[StageSpec] = field(default_factory=list)
    evaluate: EvaluationSpec | None = None
    min_tokens: int = 0
    # Checkpoints every this many steps, so a killed cell continues from its last one.
    save_every: int = 200
    # The metric compared at equal wall-clock: one logged during training (at train.eval_every),
    # eval/loss or, with vlm.eval_accuracy, eval/accuracy (on the eval set, not `evaluate`'s).
    wall_clock_metric: str = "eval/loss"
    sweep: SweepSpec | None = None

    def validate(self) -> None:
        if not self.variants:
            raise invalid("variants", "name at least two variants (one of them the baseline)")
        for name in self.variants:
            if not name.replace("-", "_").isidentifier():
                raise invalid("variants", f"{name!r} must be a plain name (letters, digits, - and _): it names folders")
        if self.baseline not in self.variants:
            raise invalid("baseline", f"{self.baseline!r} is not one of the variants {sorted(self.variants)}")
        if len(self.variants) < 2:
            raise invalid("variants", "a comparison needs at least two variants")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise invalid("seeds", f"need distinct seeds, got {self.seeds}")
        for i, name in enumerate(self.secondary):
            check_metric_name(name, f"secondary.{i}")
        evaluated = [m for m in (self.primary.name, *self.secondary) if not m.startswith(("eval/", "train/"))]
        if evaluated and self.evaluate is None:
            raise invalid("evaluate", f"metrics {evaluated} need an `evaluate` section")
        check_metric_name(self.wall_clock_metric, "wall_clock_metric")
        if not self.wall_clock_metric.startswith("eval/"):
            raise invalid("wall_clock_metric", f"{self.wall_clock_metric!r} is not logged during training: "
                                               "eval/loss, eval/accuracy or eval/accuracy/<question type>")
        names = [s.name for s in self.shared]
        if len(set(names)) != len(names):
            raise invalid("shared", f"stage names must be unique, got {names}")
        if self.sweep is not None:
            for name, overrides in self.variants.items():
                if any(o.partition("=")[0].strip() == self.sweep.key for o in overrides):
                    raise invalid(f"variants.{name}", f"sets {self.sweep.key}, which the sweep sets for every variant")
        if self.min_tokens < 0 or self.save_every < 1:
            raise invalid("save_every" if self.save_every < 1 else "min_tokens", "must be positive")

    @property
    def metrics(self) -> list[str]:
        return [self.primary.name, *[m for m in self.secondary if m != self.primary.name]]

    @property
    def cell_variants(self) -> dict[str, list[str]]:
        """What the cells run: the variants, or with a sweep each variant at each value."""
        if self.sweep is None:
            return dict(self.variants)
        return {f"{v}@{label}": [*overrides, f"{self.sweep.key}={label}"]
                for v, overrides in self.variants.items() for label in self.sweep.labels}

    def baseline_of(self, cell_variant: str) -> str:
        """The cell variant `cell_variant` is compared with: the baseline at the same sweep value."""
        if self.sweep is None:
            return self.baseline
        return f"{self.baseline}@{cell_variant.rpartition('@')[2]}"

    def swept(self, variant: str) -> dict[str, str]:
        """A variant's cell variants by sweep value label ({} without a sweep)."""
        if self.sweep is None:
            return {}
        return {label: f"{variant}@{label}" for label in self.sweep.labels}


def load_spec(path: str | Path) -> tuple[StudySpec, Path]:
    """The spec and the folder its relative paths are relative to."""
    path = Path(path)
    return parse(StudySpec, _read_spec(path, ()), ()), path.resolve().parent


def _read_spec(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"study spec not found: {path}{where}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study spec is a mapping, got {type(data).__name__}")
    base_name = data.pop("extends", None)
    if base_name is None:
        if "shared" in data:
            data["shared"] = _merge_stages([], _stage_list(data["shared"]))
        return data
    if not isinstance(base_name, str) or Path(base_name).name != base_name:
        raise invalid("extends", f"{base_name!r}: name a spec file in the same folder as {path.name}, "
                                 "so that relative paths mean the same in both")
    base_path = path.resolve().parent / base_name
    if base_path in chain or base_path == path.resolve():
        raise invalid("extends", f"{path.name} extends itself through {' -> '.join(p.name for p in chain)}")
    base = _read_spec(base_path, (*chain, path.resolve()))
    overrides = [*base.get("overrides", []), *data.pop("overrides", [])]
    if "shared" in data:
        data["shared"] = _merge_stages(base.get("shared", []), _stage_list(data["shared"]))
    return {**base, **data, **({"overrides": overrides} if overrides else {})}


def _stage_list(stages: Any) -> list[dict[str, Any]]:
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise invalid("shared", f"a list of stages (mappings), got {stages!r}")
    return stages


def _merge_stages(base: list[dict[str, Any]], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By name: a stage the base has is replaced where it stands, a new one runs after the base's.
    A stage with `like: NAME` is the stage of that name so far (the base's, or one before it)
    with its own overrides after that stage's, and its max_loss unless it sets one."""
    names = [s.get("name") for s in stages]
    if len(set(names)) != len(names):  # within one file a repeated name is a mistake, not a replacement
        raise invalid("shared", f"stage names must be unique, got {names}")
    merged = {s.get("name"): s for s in base}
    for i, stage in enumerate(stages):
        if "like" in stage:
            stage = _like(stage, merged, f"shared.{i}")
        merged[stage.get("name")] = stage
    return list(merged.values())


def _like(stage: dict[str, Any], before: dict[Any, dict[str, Any]], where: str) -> dict[str, Any]:
    stage = dict(stage)
    name = stage.pop("like")
    target = before.get(name)
    if target is None:
        raise invalid(f"{where}.like", f"{name!r} is not a stage before it: {[n for n in before]}")
    if target.get("recipe") is None:
        raise invalid(f"{where}.like", f"{name!r} is not a training stage (a stage like another takes its recipe)")
    for key in ("recipe", "synth"):
        if key in stage:
            raise invalid(f"{where}.{key}", f"a stage like {name!r} takes its recipe; give only overrides or max_loss")
    overrides = stage.get("overrides", [])
    if not isinstance(overrides, list):
        raise invalid(f"{where}.overrides", f"a list of dotted overrides, got {overrides!r}")
    out = {**{k: v for k, v in target.items() if k != "name"}, **stage}
    out["overrides"] = [*target.get("overrides", []), *overrides]
    return out
