"""Held-out worlds: synthetic LLaVA datasets the tiny recipes were not tuned on.

They check that the embedded pipeline learns what an image shows on data of another make than
the shapes world (`llava-smoe quickstart --train ...` runs every tiny stage on them as on a
user's data), and anchor it against a small non-LLM classifier (`llava-smoe bench baseline`).

- `single`: one shape per 64 px image, 8 colours x 3 kinds at a random place and size, three
  questions in four yes/no ("Is there a red shape?", "Is there a circle?", half of them "no"),
  the rest "What color is the shape?" / "What shape is it?". No captions (a user's VQA data
  often has none).
- `scatter`: 2-4 shapes of 6 colours x 4 kinds at random, non-overlapping places and sizes on a
  48 px image (no grid), captions naming them left to right, and questions on counts, colour
  of a shape, shape of a colour and which of two is further left.

Same layout as the shapes world: `instruct_{train,val,test}.json`, `pretrain.json` (captions,
`scatter` only), `images/`; every record's `meta` holds its question type and its scene.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

from llava_smoe.config import Config, invalid
from llava_smoe.data.synth import PALETTE, SUPERSAMPLE

SINGLE_COLORS = {**PALETTE, "pink": (235, 110, 180), "brown": (130, 80, 40)}  # 8 colours
BACKGROUND = (250, 250, 250)
WORLDS = ("single", "scatter")


@dataclass
class WorldConfig(Config):
    world: Literal["single", "scatter"]
    seed: int = 0
    num_train: int = 3000  # images
    num_val: int = 200
    num_test: int = 500

    def validate(self) -> None:
        if min(self.num_train, self.num_test) < 1 or self.num_val < 0:
            raise invalid("num_train", "num_train and num_test must be >= 1, num_val >= 0")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _single(rng: random.Random, size: int = 64):
    colors, shapes = list(SINGLE_COLORS), ("circle", "square", "triangle")
    color, shape = rng.choice(colors), rng.choice(shapes)
    side = size * SUPERSAMPLE
    extent = side * rng.uniform(0.2, 0.5)
    x0, y0 = rng.uniform(0, side - extent), rng.uniform(0, side - extent)
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    _draw(ImageDraw.Draw(canvas), shape, (x0, y0, x0 + extent, y0 + extent), SINGLE_COLORS[color])
    kind = rng.choice(("yes_color", "yes_shape", "yes_color", "yes_shape", "yes_color", "yes_shape", "color", "shape"))
    if kind == "color":
        qa = ("What color is the shape?", color)
    elif kind == "shape":
        qa = ("What shape is it?", shape)
    elif kind == "yes_color":
        asked = color if rng.random() < 0.5 else rng.choice([c for c in colors if c != color])
        qa = (f"Is there a {asked} shape?", "yes" if asked == color else "no")
    else:
        asked = shape if rng.random() < 0.5 else rng.choice([s for s in shapes if s != shape])
        qa = (f"Is there a {asked}?", "yes" if asked == shape else "no")
    return canvas.resize((size, size), Image.Resampling.BOX), [qa + (kind,)], None, f"{color}:{shape}"


def _scatter(rng: random.Random, size: int = 48):
    colors, shapes = list(PALETTE), ("circle", "square", "triangle", "diamond")
    side = size * SUPERSAMPLE
    n = rng.randint(2, 4)
    boxes: list[tuple[float, float, float, float]] = []
    while len(boxes) < n:  # non-overlapping, a margin apart
        extent = side * rng.uniform(0.18, 0.3)
        x0, y0 = rng.uniform(0, side - extent), rng.uniform(0, side - extent)
        box = (x0, y0, x0 + extent, y0 + extent)
        if all(box[2] + 8 < b[0] or b[2] + 8 < box[0] or box[3] + 8 < b[1] or b[3] + 8 < box[1] for b in boxes):
            boxes.append(box)
    def center_x(box):
        return (box[0] + box[2]) / 2

    objects = sorted(((b, rng.choice(colors), rng.choice(shapes)) for b in boxes), key=lambda o: center_x(o[0]))
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for box, color, shape in objects:
        _draw(draw, shape, box, PALETTE[color])
    combos = Counter((c, s) for _, c, s in objects)
    by_shape, by_color = Counter(s for _, _, s in objects), Counter(c for _, c, _ in objects)
    words = {2: "two", 3: "three", 4: "four"}
    candidates = [("How many shapes are there?", words[n], "count")]
    unique = [o for o in objects if combos[(o[1], o[2])] == 1]
    shapes_once = [o for o in objects if by_shape[o[2]] == 1]
    if shapes_once:
        _, color, shape = rng.choice(shapes_once)
        candidates.append((f"What color is the {shape}?", color, "color_of_shape"))
    colors_once = [o for o in objects if by_color[o[1]] == 1]
    if colors_once:
        _, color, shape = rng.choice(colors_once)
        candidates.append((f"What shape is the {color} one?", shape, "shape_of_color"))
    # Only pairs whose centres are clearly apart (an eighth of the width): "further left" must be visible.
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:]
             if abs(center_x(a[0]) - center_x(b[0])) > side / 8]
    if pairs:
        a, b = rng.choice(pairs)
        left = a if center_x(a[0]) < center_x(b[0]) else b
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        candidates.append((f"Which is further left, the {first[1]} {first[2]} or the {second[1]} {second[2]}?",
                           left[2], "further_left"))
    caption = "From left to right: " + ", ".join(f"a {c} {s}" for _, c, s in objects) + "."
    scene = "|".join(f"{round(center_x(b) / SUPERSAMPLE)}:{c}:{s}" for b, c, s in objects)  # centre x in pixels
    return canvas.resize((size, size), Image.Resampling.BOX), [rng.choice(candidates)], caption, scene


def generate_world(config: WorldConfig, out_dir: str) -> dict:
    make = {"single": _single, "scatter": _scatter}[config.world]
    files: dict[str, list[dict]] = {"instruct_train": [], "instruct_val": [], "instruct_test": [], "pretrain": []}
    types: dict[str, Counter] = {}
    for split, n in (("train", config.num_train), ("val", config.num_val), ("test", config.num_test)):
        rng = random.Random(f"{config.world}/{config.seed}/{split}")
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        types[split] = Counter()
        for i in range(n):
            image, questions, caption, scene = make(rng)
            rel = f"{split}/{i:06d}.png"
            image.save(os.path.join(out_dir, "images", rel))
            for k, (question, answer, kind) in enumerate(questions):
                files[f"instruct_{split}"].append({
                    "id": f"{split}-{i:06d}-q{k}", "image": rel,
                    "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
                    "meta": {"types": [kind], "scene": scene}})
                types[split][kind] += 1
            if caption is not None and split == "train":
                files["pretrain"].append({"id": f"pretrain-{i:06d}", "image": rel, "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]})
    for name, records in files.items():
        if records:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(records, f, indent=1)
    manifest = {"dataset": f"world_{config.world}", "config": config.to_dict(),
                "counts": {k: len(v) for k, v in files.items()},
                "question_types": {s: dict(sorted(c.items())) for s, c in types.items()}}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
