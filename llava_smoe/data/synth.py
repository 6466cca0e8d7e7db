"""The shapes world: a synthetic LLaVA dataset a tiny model can learn in CPU minutes.

Images hold 1-3 shapes (circle / square / triangle) in distinct cells of a 2x2 grid, coloured
from a 4-colour palette, on a plain background. Questions have single-word answers drawn from a
~20-word vocabulary and are balanced by construction (count, colour and shape by shape, colour or
cell, side; presence on request), so answering without looking ("blind") scores near chance while
a model that sees the image can reach near-perfect exact match.

The harder world (`HARD_WORLD`: a 3x3 grid, up to 5 of 5 shapes in 6 colours, and questions that
count by attribute and relate neighbouring shapes) is one the tiny pipeline does not saturate:
room for capacity and routing to matter. The defaults generate the original world, byte for
byte.

Splits: every scene layout (which shape of which colour in which cell) belongs to exactly one
of train / val / test through a seeded hash, so test images are unseen layouts, not just new
pixels. Scenes containing a held-out (colour, shape) combination appear only in the extra
`instruct_heldout.json` split: a compositional-generalisation probe. Text-only samples (facts
about shapes, no image) appear only in training, to exercise mixed batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

from llava_smoe.config import Config, ConfigError, parse

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
ALL_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {name: PALETTE[name] for name in list(PALETTE)[:4]}  # the original world's
SHAPES = ALL_SHAPES[:3]
CELL_NAMES = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top middle", "top right", "middle left", "center", "middle right",
        "bottom left", "bottom middle", "bottom right"),
}  # row-major
CELLS = CELL_NAMES[2]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
COUNT_WORDS = {0: "zero", **NUMBERS}
BACKGROUND = (245, 245, 245)
SUPERSAMPLE = 4  # draw large, then downsample: clean edges at 32 px
PRETRAIN_PROMPT = "<image>\nDescribe the image."
SPLITS = ("train", "val", "test")
SHAPE_FACTS = [
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many sides does a circle have?", "zero"),
    ("Which shape has three sides?", "triangle"),
    ("Which shape has four sides?", "square"),
    ("Which shape is round?", "circle"),
]

Obj = tuple[int, str, str]  # (cell, colour, shape)
QUESTION_TYPES = ("count", "color_of_shape", "shape_of_color", "shape_at", "color_at", "exists", "side",
                  "count_color", "count_shape", "shape_next_to", "color_next_to", "lookup")
NEIGHBOURS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
# Presence questions ("Is there a red circle?") are off by default: their answer depends on the
# question and the image only jointly (each alone says nothing), and gradient descent finds no
# foothold in CPU minutes: the tiny model stays at chance even when trained on them alone.
DEFAULT_QUESTION_TYPES = ("count", "color_of_shape", "shape_of_color", "shape_at", "color_at", "side")
ALWAYS_ASKABLE = {"count", "shape_at", "color_at"}
# The harder world: 3x3 grid, 6 colours, 5 shapes, up to 5 objects, 48 px (16 px cells), and
# questions that count by attribute and relate neighbours besides the original ones.
HARD_WORLD = {
    "grid": 3, "num_colors": 6, "num_shapes": 5, "max_shapes": 5, "image_size": 48,
    "question_types": ["count", "color_of_shape", "shape_of_color", "shape_at", "color_at", "side",
                       "count_color", "count_shape", "shape_next_to", "color_next_to"],
}
# Knowledge questions ("lookup"): a table drawn from the seed gives every kind of object (colour,
# shape) a value, one of LOOKUP_VALUES, for each of `lookup_properties` made-up properties. "What
# is the <property> of the <colour> object?" takes the object's shape from the image and the value
# from what the LM has stored: properties x colours x shapes facts, a store whose size the world
# sets, the part of a task where the LM's capacity (FFN width, experts) would be expected to matter
# (docs/results.md: at the tiny recipes' budgets it does not).
LOOKUP_VALUES = ("zum", "kel", "vop", "rif", "dax", "wug", "tup", "fep")
LOOKUP_WORLD = {"question_types": [*DEFAULT_QUESTION_TYPES, "lookup"], "lookup_questions": 4}  # the quickstart's + lookup
CAPTION_ORDERS = ("cells", "random")
SIDE_OPTIONS = ("fixed", "random")


@dataclass
class ShapesWorldConfig(Config):
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    num_heldout: int = 100
    image_size: int = 32
    max_shapes: int = 3
    max_turns: int = 3
    # One record per question, the image before each (as evaluation asks them), instead of one
    # record holding all of an image's questions: a tiny LM finds a cell's token by its distance
    # from the question, which later turns make longer and variable.
    single_turn: bool = False
    text_only_fraction: float = 0.05
    holdout_combos: list[tuple[str, str]] = field(default_factory=lambda: [("yellow", "triangle")])
    vocab_size: int = 512
    question_types: list[str] = field(default_factory=lambda: list(DEFAULT_QUESTION_TYPES))
    # Shape size as a fraction of its cell, and how far it may drift from the cell's centre (as a
    # fraction of the free space). Small variation keeps a tiny tower's shape features learnable in
    # CPU minutes; widen both for a harder task.
    size_range: tuple[float, float] = (0.7, 0.8)
    jitter: float = 0.2
    # Order of the objects in a caption: "cells" (row-major), which a model can follow by
    # stepping through the grid, or "random", where saying where a named object is takes looking
    # it up by what it is (as side questions do).
    caption_order: str = "cells"
    # Order of the two answers a side question offers: "fixed" (left / top first) or "random".
    side_options: str = "fixed"
    # Where a question's image goes: "first" (before the question, as in LLaVA's data) or "last"
    # (after it, right before the answer). A tiny LM finds a cell's token by its distance from
    # the answer, which is then the same for every question.
    image_position: str = "first"
    # The world's size: a grid x grid layout, the first num_colors of PALETTE and num_shapes of
    # ALL_SHAPES (the defaults are the original world).
    grid: int = 2
    num_colors: int = 4
    num_shapes: int = 3
    # Knowledge questions (question type "lookup"): how many made-up properties the table holds,
    # and how many lookup questions each image offers among its candidates (their share of the
    # questions asked).
    lookup_properties: int = 48
    lookup_questions: int = 1

    @property
    def colors(self) -> list[str]:
        return list(PALETTE)[: self.num_colors]

    @property
    def shapes(self) -> tuple[str, ...]:
        return ALL_SHAPES[: self.num_shapes]

    @property
    def cells(self) -> tuple[str, ...]:
        return CELL_NAMES[self.grid]

    def validate(self) -> None:
        for name in ("num_train", "num_val", "num_test", "num_heldout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_train == 0:
            raise ValueError("num_train must be > 0 (the tokenizer is trained on the training text)")
        if self.grid not in CELL_NAMES:
            raise ValueError(f"grid must be one of {sorted(CELL_NAMES)}, got {self.grid}")
        if not 2 <= self.num_colors <= len(PALETTE) or not 2 <= self.num_shapes <= len(ALL_SHAPES):
            raise ValueError(f"num_colors must be in [2, {len(PALETTE)}] and num_shapes in [2, {len(ALL_SHAPES)}], "
                             f"got {self.num_colors} and {self.num_shapes}")
        if self.image_size < 8 * self.grid:
            raise ValueError(f"image_size must be >= {8 * self.grid} pixels for shapes to stay recognisable, "
                             f"got {self.image_size}")
        if not 1 <= self.max_shapes <= len(self.cells):
            raise ValueError(f"max_shapes must be in [1, {len(self.cells)}], got {self.max_shapes}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.text_only_fraction < 1.0:
            raise ValueError(f"text_only_fraction must be in [0, 1), got {self.text_only_fraction}")
        self.size_range = tuple(float(v) for v in self.size_range)
        if not 0.2 <= self.size_range[0] <= self.size_range[1] <= 1.0:
            raise ValueError(f"size_range must satisfy 0.2 <= low <= high <= 1, got {self.size_range}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.side_options not in SIDE_OPTIONS:
            raise ValueError(f"side_options must be one of {list(SIDE_OPTIONS)}, got {self.side_options!r}")
        from llava_smoe.processing.templates import IMAGE_POSITIONS  # torch-free data generation: imported late

        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position must be one of {list(IMAGE_POSITIONS)}, got {self.image_position!r}")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"caption_order must be one of {list(CAPTION_ORDERS)}, got {self.caption_order!r}")
        self.holdout_combos = [tuple(c) for c in self.holdout_combos]
        for color, shape in self.holdout_combos:
            if color not in self.colors or shape not in self.shapes:
                raise ValueError(f"held-out combination ({color!r}, {shape!r}) must use colours {self.colors} and "
                                 f"shapes {list(self.shapes)}")
        if len(self.holdout_combos) >= len(self.colors) * len(self.shapes) - 1:
            raise ValueError("holding out that many combinations leaves too few to train on")
        if not set(self.question_types) <= set(QUESTION_TYPES) or not set(self.question_types) & ALWAYS_ASKABLE:
            raise ValueError(f"question_types must be a subset of {list(QUESTION_TYPES)} with at least one of "
                             f"{sorted(ALWAYS_ASKABLE)} (askable about every scene), got {self.question_types}")
        self.question_types = list(self.question_types)
        if not 1 <= self.lookup_properties <= MAX_LOOKUP_PROPERTIES or self.lookup_questions < 1:
            raise ValueError(f"lookup_properties must be in [1, {MAX_LOOKUP_PROPERTIES}] and lookup_questions >= 1, "
                             f"got {self.lookup_properties} and {self.lookup_questions}")
        if self.num_heldout and not self.holdout_combos:
            raise ValueError("num_heldout > 0 needs at least one held-out (colour, shape) combination")



WORLDS = ("hard", "lookup")


def world_settings(names: list[str]) -> dict:
    """The generator settings of the named worlds, applied in order: `hard` is HARD_WORLD, `lookup`
    adds lookup questions to the world so far (the quickstart's, or the hard one)."""
    world: dict = {}
    for name in names:
        if name == "hard":
            world.update({k: list(v) if isinstance(v, list) else v for k, v in HARD_WORLD.items()})
        elif name == "lookup":
            world["question_types"] = [*world.get("question_types", DEFAULT_QUESTION_TYPES), "lookup"]
            world["lookup_questions"] = LOOKUP_WORLD["lookup_questions"]
        else:
            raise ValueError(f"{name!r} is not a world: {list(WORLDS)}")
    return world


def parse_world(settings: dict, path: tuple[str, ...] = ()) -> ShapesWorldConfig:
    """A ShapesWorldConfig from a mapping of its fields plus `world` (a name of WORLDS or a list of
    them): the named worlds' settings first, the mapping's own fields over them."""
    settings = dict(settings)
    names = settings.pop("world", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"give a world's name or a list of them, one of {list(WORLDS)}; got {names!r}", (*path, "world"))
    try:
        world = world_settings(names)
    except ValueError as exc:
        raise ConfigError(str(exc), (*path, "world")) from None
    return parse(ShapesWorldConfig, {**world, **settings}, path)

# Two consonant-vowel syllables, the last vowel not "e": no word of the world's ("side", "five").
_FIRST = [c + v for c in "bdfglmnprstv" for v in "aeiou"]
_LAST = [c + v for c in "bdfglmnprstv" for v in "aiou"]
MAX_LOOKUP_PROPERTIES = len(_FIRST) * len(_LAST)


@functools.cache
def _property_names() -> tuple[str, ...]:
    words = [a + b for a in _FIRST for b in _LAST]
    random.Random("lookup-properties").shuffle(words)
    return tuple(words)


def lookup_properties(n: int) -> tuple[str, ...]:
    """The first n made-up property names ("bano", "tefi", ...), the same in every world and seed."""
    return _property_names()[:n]


def lookup_table(config: ShapesWorldConfig) -> dict[tuple[str, str, str], str]:
    """(property, colour, shape) -> value: the facts lookup questions ask, drawn from the seed
    (computed once per world: every image's questions read it)."""
    return _lookup_table(config.seed, config.lookup_properties, tuple(config.colors), tuple(config.shapes))


@functools.cache
def _lookup_table(seed: int, properties: int, colors: tuple[str, ...], shapes: tuple[str, ...]) -> dict:
    rng = random.Random(f"lookup/{seed}")
    return {(p, c, s): rng.choice(LOOKUP_VALUES) for p in lookup_properties(properties) for c in colors for s in shapes}


def scene_key(scene: list[Obj]) -> str:
    return "|".join(f"{cell}:{color}:{shape}" for cell, color, shape in sorted(scene))


def split_of(scene: list[Obj], seed: int) -> str:
    """Seeded hash partition of scene layouts: ~10% test, ~10% val, the rest train."""
    bucket = int(hashlib.sha256(f"{seed}|{scene_key(scene)}".encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def sample_scene(rng: random.Random, split: str, config: ShapesWorldConfig) -> list[Obj]:
    held = set(config.holdout_combos)
    n = rng.randint(1, config.max_shapes)  # drawn once so counts stay balanced under rejection
    colors, shapes = config.colors, config.shapes
    for _ in range(100_000):
        cells = sorted(rng.sample(range(len(config.cells)), n))
        scene = [(c, rng.choice(colors), rng.choice(shapes)) for c in cells]
        has_held = any((color, shape) in held for _, color, shape in scene)
        if split == "heldout":
            if has_held:
                return scene
        elif not has_held and split_of(scene, config.seed) == split:
            return scene
    raise RuntimeError(f"could not draw a {n}-shape scene for split {split!r}; use more shapes or another seed")


def render_scene(scene: list[Obj], image_size: int, rng: random.Random,
                 size_range: tuple[float, float] = (0.7, 0.8), jitter: float = 0.2, grid: int = 2) -> Image.Image:
    side = image_size * SUPERSAMPLE
    cell = side / grid
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, color, shape in scene:
        row, col = divmod(c, grid)
        size = cell * rng.uniform(*size_range)
        slack = cell - size
        x0 = col * cell + (0.5 + rng.uniform(-0.5, 0.5) * jitter) * slack
        y0 = row * cell + (0.5 + rng.uniform(-0.5, 0.5) * jitter) * slack
        box = (x0, y0, x0 + size, y0 + size)
        fill = PALETTE[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=fill)
        elif shape == "diamond":
            h = size / 2
            draw.polygon([(x0 + h, y0), (x0 + size, y0 + h), (x0 + h, y0 + size), (x0, y0 + h)], fill=fill)
        else:  # cross: a plus sign of bars a third of the size wide
            t = size / 3
            draw.rectangle((x0 + t, y0, x0 + 2 * t, y0 + size), fill=fill)
            draw.rectangle((x0, y0 + t, x0 + size, y0 + 2 * t), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: list[Obj], rng: random.Random | None = None, cells: tuple[str, ...] = CELLS) -> str:
    """The caption; objects in cell order, or shuffled by `rng` when given."""
    objects = sorted(scene)
    if rng is not None:
        rng.shuffle(objects)
    parts = [f"{_article(color)} {color} {shape} in the {cells[c]}" for c, color, shape in objects]
    if len(parts) == 1:
        return f"There is {parts[0]}."
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There are {NUMBERS[len(parts)]} shapes: {listed}."


def candidate_questions(scene: list[Obj], rng: random.Random, config: ShapesWorldConfig, split: str) -> list[tuple[str, str, str]]:
    """One (question, answer, type) per applicable question type for this scene (lookup:
    `config.lookup_questions` of them, about distinct properties)."""
    held = set(config.holdout_combos) if split != "heldout" else set()
    CELLS, COLORS, SHAPES = config.cells, config.colors, config.shapes  # noqa: N806 - this world's
    shape_counts = Counter(s for _, _, s in scene)
    color_counts = Counter(c for _, c, _ in scene)
    combo_counts = Counter((c, s) for _, c, s in scene)
    out = [("How many shapes are there?", NUMBERS[len(scene)], "count")]
    unique_shapes = [o for o in scene if shape_counts[o[2]] == 1]
    if unique_shapes:
        _, color, shape = rng.choice(unique_shapes)
        out.append((f"What color is the {shape}?", color, "color_of_shape"))
    unique_colors = [o for o in scene if color_counts[o[1]] == 1]
    if unique_colors:
        _, color, shape = rng.choice(unique_colors)
        out.append((f"What shape is the {color} object?", shape, "shape_of_color"))
    c, color, shape = rng.choice(scene)
    out.append((f"What shape is in the {CELLS[c]}?", shape, "shape_at"))
    c, color, shape = rng.choice(scene)
    out.append((f"What color is the shape in the {CELLS[c]}?", color, "color_at"))
    if rng.random() < 0.5:
        _, color, shape = rng.choice(scene)
        out.append((f"Is there a {color} {shape}?", "yes", "exists"))
    else:
        absent = [(c_, s_) for c_ in COLORS for s_ in SHAPES if (c_, s_) not in combo_counts and (c_, s_) not in held]
        color, shape = rng.choice(absent)
        out.append((f"Is there a {color} {shape}?", "no", "exists"))
    unique_combos = [o for o in scene if combo_counts[(o[1], o[2])] == 1]
    g, middle = config.grid, config.grid // 2 if config.grid % 2 else None
    if unique_combos:
        c, color, shape = rng.choice(unique_combos)
        row, col = divmod(c, g)
        if rng.random() < 0.5:
            options, answer, where = ("left", "right"), "left" if col < g / 2 else "right", "on"
            central = col == middle
        else:
            options, answer, where = ("top", "bottom"), "top" if row < g / 2 else "bottom", "at"
            central = row == middle
        if config.side_options == "random" and rng.random() < 0.5:
            options = options[::-1]
        if not central:  # a shape in the middle column (or row) is on neither side
            out.append((f"Is the {color} {shape} {where} the {options[0]} or the {options[1]}?", answer, "side"))
    # The harder world's questions; drawn only when asked for, so the original world's draws stay as they were.
    wanted = set(config.question_types)
    # Counting by attribute, absent ones included ("zero"): the count is drawn first, uniformly
    # over those the scene has, so that "one" (most attributes appear once) is not the answer
    # blind guessing learns.
    if "count_color" in wanted:
        counts = Counter({c: color_counts[c] for c in COLORS})
        color = _by_count(counts, rng)
        out.append((f"How many {color} shapes are there?", COUNT_WORDS[counts[color]], "count_color"))
    if "count_shape" in wanted:
        counts = Counter({s: shape_counts[s] for s in SHAPES})
        shape = _by_count(counts, rng)
        out.append((f"How many {shape}s are there?", COUNT_WORDS[counts[shape]], "count_shape"))
    by_cell = {c: (color, shape) for c, color, shape in scene}
    for kind in ("shape_next_to", "color_next_to"):
        if kind not in wanted:
            continue
        pairs = []  # (a uniquely described shape, a relation, the shape in that neighbouring cell)
        for c, color, shape in unique_combos:
            row, col = divmod(c, g)
            for relation, (dr, dc) in NEIGHBOURS.items():
                r2, c2 = row + dr, col + dc
                if 0 <= r2 < g and 0 <= c2 < g and r2 * g + c2 in by_cell:
                    pairs.append((color, shape, relation, by_cell[r2 * g + c2]))
        if pairs:
            color, shape, relation, (n_color, n_shape) = rng.choice(pairs)
            if kind == "shape_next_to":
                out.append((f"What shape is {relation} the {color} {shape}?", n_shape, kind))
            else:
                out.append((f"What color is the shape {relation} the {color} {shape}?", n_color, kind))
    if "lookup" in wanted and unique_colors:
        table, names = lookup_table(config), lookup_properties(config.lookup_properties)
        for prop in rng.sample(names, min(config.lookup_questions, len(names))):
            _, color, shape = rng.choice(unique_colors)
            out.append((f"What is the {prop} of the {color} object?", table[(prop, color, shape)], "lookup"))
    return [q for q in out if q[2] in config.question_types]


def _by_count(counts: Counter, rng: random.Random) -> str:
    n = rng.choice(sorted(set(counts.values())))
    return rng.choice(sorted(k for k, v in counts.items() if v == n))


def make_conversation(scene: list[Obj], rng: random.Random, config: ShapesWorldConfig, split: str) -> tuple[list[dict], list[str]]:
    candidates = candidate_questions(scene, rng, config, split)  # never empty (ALWAYS_ASKABLE)
    turns = rng.sample(candidates, min(rng.randint(1, config.max_turns), len(candidates)))
    conversation: list[dict] = []
    for k, (question, answer, _) in enumerate(turns):
        conversation.append({"from": "human", "value": with_image(question, config.image_position) if k == 0 else question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation, [t for _, _, t in turns]


def with_image(question: str, position: str) -> str:
    """The question's text with the image placeholder first or last."""
    from llava_smoe.processing.templates import with_placeholders  # torch-free import of synth: late

    return with_placeholders(question, "<image>", 1, position)


def _records(record_id: str, image: str, scene: list[Obj], conversation: list[dict], qtypes: list[str],
             single_turn: bool, image_position: str) -> list[dict]:
    """One LLaVA record for the conversation, or (single_turn) one per question."""
    if not single_turn:
        return [{"id": record_id, "image": image, "conversations": conversation,
                 "meta": {"scene": scene_key(scene), "types": qtypes}}]
    records = []
    for k, (question, answer) in enumerate(zip(conversation[::2], conversation[1::2])):
        text = question["value"].replace("<image>", "").strip()
        records.append({"id": f"{record_id}-q{k}", "image": image,
                        "conversations": [{"from": "human", "value": with_image(text, image_position)}, answer],
                        "meta": {"scene": scene_key(scene), "types": [qtypes[k]]}})
    return records


def _split_seed(seed: int, split: str) -> int:
    return int(hashlib.sha256(f"{seed}/{split}".encode()).hexdigest()[:12], 16)


def generate_shapes_world(config: ShapesWorldConfig, out_dir: str) -> dict:
    """Write the dataset under `out_dir`; return the manifest (also written as manifest.json)."""
    from llava_smoe.processing.tokenizer import train_bpe_tokenizer

    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test, "heldout": config.num_heldout}
    files: dict[str, list[dict]] = {"pretrain": [], "instruct_train": [], "instruct_val": [], "instruct_test": [], "instruct_heldout": [],
                                    "captions_test": []}
    # Test captions (for `llava-smoe probe`) draw their order from their own stream, so the other
    # files do not depend on whether they are written.
    captions_rng = random.Random(_split_seed(config.seed, "captions-test"))
    answers: dict[str, Counter] = {}
    types: dict[str, Counter] = {}
    text_lines: list[str] = []
    for split, n in counts.items():
        rng = random.Random(_split_seed(config.seed, split))
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        answers[split], types[split] = Counter(), Counter()
        for i in range(n):
            scene = sample_scene(rng, split, config)
            rel = f"{split}/{i:06d}.png"
            render_scene(scene, config.image_size, rng, config.size_range, config.jitter,
                         config.grid).save(os.path.join(out_dir, "images", rel))
            conversation, qtypes = make_conversation(scene, rng, config, split)
            files[f"instruct_{split}"] += _records(f"{split}-{i:06d}", rel, scene, conversation, qtypes, config.single_turn,
                                                    config.image_position)
            answers[split].update(t["value"] for t in conversation if t["from"] == "gpt")
            types[split].update(qtypes)
            if split in ("train", "test"):  # test captions draw their order from their own stream
                order_rng = rng if split == "train" else captions_rng
                caption = describe(scene, order_rng if config.caption_order == "random" else None, config.cells)
                record = {"image": rel, "conversations": [{"from": "human", "value": PRETRAIN_PROMPT},
                                                          {"from": "gpt", "value": caption}]}
            if split == "train":
                files["pretrain"].append({"id": f"pretrain-{i:06d}", **record})
                text_lines.append(caption)
                text_lines += [f"{q['value'].replace('<image>', '').strip()} {a['value']}" for q, a in zip(conversation[::2], conversation[1::2])]
            elif split == "test":
                files["captions_test"].append({"id": f"caption-test-{i:06d}", **record, "meta": {"scene": scene_key(scene)}})
    for j in range(round(config.num_train * config.text_only_fraction)):
        rng = random.Random(_split_seed(config.seed, f"text-{j}"))
        question, answer = rng.choice(SHAPE_FACTS)
        files["instruct_train"].append({
            "id": f"text-{j:06d}",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        })
        text_lines.append(f"{question} {answer}")
    # Text-only samples go in deterministic positions among the image samples.
    random.Random(_split_seed(config.seed, "mix")).shuffle(files["instruct_train"])

    os.makedirs(out_dir, exist_ok=True)
    for name, records in files.items():
        _write_json(os.path.join(out_dir, f"{name}.json"), records)
    with open(os.path.join(out_dir, "text.txt"), "w") as f:
        f.write("\n".join(text_lines) + "\n")
    # Answers also start a line (chat templates put them right after a newline), so each one
    # becomes a token both with and without a leading space.
    answer_words = sorted({a for c in answers.values() for a in c} | {a for _, a in SHAPE_FACTS})
    tokenizer = train_bpe_tokenizer(iter(text_lines + answer_words * 4), vocab_size=config.vocab_size)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))

    manifest = {
        "dataset": "shapes_world",
        "config": {**asdict(config), "holdout_combos": [list(c) for c in config.holdout_combos]},
        "image_folder": "images",
        "tokenizer": "tokenizer",
        "counts": {name: len(records) for name, records in files.items()} | {"text_lines": len(text_lines)},
        "answer_counts": {s: dict(sorted(c.items())) for s, c in answers.items()},
        "question_types": {s: dict(sorted(c.items())) for s, c in types.items()},
        "colors": config.colors,
        "shapes": list(config.shapes),
        "cells": list(config.cells),
    }
    if "lookup" in config.question_types:  # the facts, so that every lookup answer can be checked
        table = lookup_table(config)
        manifest["lookup"] = {p: {f"{c} {s_}": table[(p, c, s_)] for c in config.colors for s_ in config.shapes}
                              for p in lookup_properties(config.lookup_properties)}
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")

