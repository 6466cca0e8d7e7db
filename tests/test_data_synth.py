import hashlib
import json
import os
import re
from collections import Counter, defaultdict

import pytest
from PIL import Image

from llava_smoe.cli import main as cli_main
from llava_smoe.data import (
    DataConfig,
    LlavaDataset,
    ShapesWorldConfig,
    generate_shapes_world,
)
from llava_smoe.data.synth import COLORS, DEFAULT_QUESTION_TYPES, LOOKUP_VALUES, QUESTION_TYPES, SHAPES
from llava_smoe.processing import LlavaSmoeProcessor, ProcessorConfig

SMALL = dict(num_train=300, num_val=40, num_test=60, num_heldout=20, image_size=32, question_types=list(QUESTION_TYPES))


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert cli_main(["data", "synth", "--out", str(out), "--seed", "0", "--num-train", "300", "--num-val", "40",
                     "--num-test", "60", "--num-heldout", "20", "--image-size", "32",
                     "--question-types", ",".join(QUESTION_TYPES)]) == 0  # presence questions too
    return out


def load(world, name):
    return json.loads((world / f"{name}.json").read_text())


def test_same_seed_gives_identical_files(world, tmp_path):
    generate_shapes_world(ShapesWorldConfig(seed=0, **SMALL), str(tmp_path / "again"))
    assert digest(world) == digest(tmp_path / "again")
    generate_shapes_world(ShapesWorldConfig(seed=1, **SMALL), str(tmp_path / "other"))
    assert digest(tmp_path / "other")["instruct_train.json"] != digest(world)["instruct_train.json"]


def test_manifest_and_files(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 0
    assert manifest["counts"]["pretrain"] == 300 == len(load(world, "pretrain"))
    assert manifest["counts"]["instruct_test"] == 60 == len(load(world, "instruct_test"))
    assert manifest["counts"]["instruct_train"] == 300 + 15  # 5% text-only samples
    assert len(list((world / "images" / "train").glob("*.png"))) == 300
    assert (world / "text.txt").read_text().count("\n") == manifest["counts"]["text_lines"]


def test_splits_are_disjoint_and_combinations_held_out(world):
    scenes = {s: {r["meta"]["scene"] for r in load(world, f"instruct_{s}") if "meta" in r} for s in ("train", "val", "test", "heldout")}
    assert not scenes["test"] & (scenes["train"] | scenes["val"])
    assert not scenes["val"] & scenes["train"]
    images = {s: {r["image"] for r in load(world, f"instruct_{s}") if "image" in r} for s in scenes}
    assert not images["test"] & images["train"]

    def has_held(scene):
        return any(part.endswith(":yellow:triangle") for part in scene.split("|"))

    assert all(has_held(s) for s in scenes["heldout"])
    assert not any(has_held(s) for s in scenes["train"] | scenes["val"] | scenes["test"])
    # Text-only samples only in training.
    assert any("image" not in r for r in load(world, "instruct_train"))
    assert all("image" in r for r in load(world, "instruct_test"))


def test_answers_are_single_words_and_blind_guessing_is_poor(world):
    train, test = load(world, "instruct_train"), load(world, "instruct_test")

    def qa(records):
        for r in records:
            c = r["conversations"]
            for q, a in zip(c[::2], c[1::2]):
                yield q["value"].replace("<image>\n", ""), a["value"]

    vocab = {a for _, a in qa(train)}
    assert all(" " not in a for a in vocab) and len(vocab - set(LOOKUP_VALUES)) <= 20
    assert set(COLORS) | set(SHAPES) | {"yes", "no", "one", "two", "three"} <= vocab
    # The best image-blind answer per question (majority in train) scores far below a seeing model.
    by_question = defaultdict(Counter)
    for q, a in qa(train):
        by_question[q][a] += 1
    pairs = list(qa(test))
    blind = sum(by_question[q].most_common(1)[0][0] == a for q, a in pairs if q in by_question) / len(pairs)
    assert blind < 0.55


def test_dataset_loads_with_the_generated_tokenizer(world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(template="chatml", num_image_tokens=16,
                                                              image={"image_size": 32}))
    assert processor.added_tokens == []
    for name in ("pretrain", "instruct_train", "instruct_test"):
        ds = LlavaDataset(DataConfig(str(world / f"{name}.json"), str(world / "images"), max_length=256), processor)
        assert ds.validate().total == 0
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32)
    # The small tokenizer covers the vocabulary: each answer word is one token.
    for word in [*COLORS, *SHAPES, "yes", "no", "three"]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word


def test_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorldConfig(image_size=8)
    with pytest.raises(ValueError, match="held-out combination"):
        ShapesWorldConfig(holdout_combos=[("purple", "circle")])
    with pytest.raises(ValueError, match="num_heldout"):
        ShapesWorldConfig(holdout_combos=[], num_heldout=5)
    with pytest.raises(ValueError, match="question_types"):
        ShapesWorldConfig(question_types=["colour"])
    with pytest.raises(ValueError, match="askable about every scene"):
        ShapesWorldConfig(question_types=["side"])


def test_question_types_choose_what_is_asked(tmp_path):
    default = generate_shapes_world(ShapesWorldConfig(seed=1, num_train=60, num_val=0, num_test=0, num_heldout=0),
                                    tmp_path / "default")
    assert set(default["question_types"]["train"]) == set(DEFAULT_QUESTION_TYPES) and "exists" not in DEFAULT_QUESTION_TYPES
    chosen = generate_shapes_world(ShapesWorldConfig(seed=1, num_train=60, num_val=0, num_test=0, num_heldout=0,
                                                     question_types=["count", "exists"], max_turns=2), tmp_path / "two")
    assert set(chosen["question_types"]["train"]) == {"count", "exists"}
    records = json.loads((tmp_path / "two" / "instruct_train.json").read_text())
    asked = [t["value"] for r in records if "meta" in r for t in r["conversations"] if t["from"] == "human"]
    assert all(q.replace("<image>\n", "").startswith(("How many", "Is there")) for q in asked)


def test_single_turn_asks_the_same_questions_one_per_record(world, tmp_path):
    from llava_smoe.evaluation.questions import load_questions

    assert cli_main(["data", "synth", "--out", str(tmp_path), "--seed", "0", "--num-train", "300", "--num-val", "40",
                     "--num-test", "60", "--num-heldout", "20", "--image-size", "32",
                     "--question-types", ",".join(QUESTION_TYPES), "--single-turn"]) == 0
    for split in ("train", "test"):
        single, multi = load(tmp_path, f"instruct_{split}"), load(world, f"instruct_{split}")
        assert len(single) > len(multi)  # scenes with several questions became several records
        for record in (r for r in single if "image" in r):
            human, gpt = record["conversations"]
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert len(record["meta"]["types"]) == 1 and gpt["from"] == "gpt"

        def asked(folder):  # training records are shuffled: compare as multisets
            return sorted((q.question, q.answer, q.question_type, q.image_path and os.path.relpath(q.image_path, folder))
                          for q in load_questions(str(folder / f"instruct_{split}.json")))

        assert asked(tmp_path) == asked(world)
    # The images, captions and tokenizer do not depend on how questions are grouped.
    same = digest(world)
    for name, sha in digest(tmp_path).items():
        if not name.startswith(("instruct_", "manifest")):
            assert same[name] == sha, name


@pytest.mark.parametrize("multi", [False, True])
def test_image_position_last_puts_the_image_after_each_question(tmp_path, multi):
    args = ["--seed", "0", "--num-train", "200", "--num-val", "20", "--num-test", "40", "--num-heldout", "10"]
    args += [] if multi else ["--single-turn"]
    assert cli_main(["data", "synth", "--out", str(tmp_path / "first"), *args]) == 0
    assert cli_main(["data", "synth", "--out", str(tmp_path / "last"), *args, "--image-position", "last"]) == 0
    for split in ("train", "test"):
        first, last = load(tmp_path / "first", f"instruct_{split}"), load(tmp_path / "last", f"instruct_{split}")
        assert len(first) == len(last)
        for a, b in zip(first, last):
            if "image" not in a:
                assert a == b
                continue
            question = a["conversations"][0]["value"].removeprefix("<image>\n")
            assert "<image>" not in question
            assert b["conversations"][0]["value"] == question + "\n<image>"
            assert a["conversations"][1:] == b["conversations"][1:]  # later turns carry no image
    # Only where the placeholder sits changes: images, captions, text and tokenizer are the same.
    same = digest(tmp_path / "first")
    for name, sha in digest(tmp_path / "last").items():
        if not name.startswith(("instruct_", "manifest")):
            assert same[name] == sha, name
    with pytest.raises(ValueError, match="image_position must be one of"):
        ShapesWorldConfig(image_position="middle")


def _described(caption):
    """[(colour, shape, cell), ...] in caption order."""
    return re.findall(r"a (\w+) (\w+) in the (top left|top right|bottom left|bottom right)", caption)


@pytest.mark.parametrize("order", ["random", "cells"])
def test_captions_name_every_object_in_the_chosen_order(tmp_path, order):
    from llava_smoe.data.synth import CELLS

    generate_shapes_world(ShapesWorldConfig(seed=2, num_train=120, num_val=0, num_test=0, num_heldout=0,
                                            caption_order=order), tmp_path)
    scenes = {r["image"]: r["meta"]["scene"] for r in json.loads((tmp_path / "instruct_train.json").read_text())
              if "image" in r}
    in_cell_order = []
    for record in json.loads((tmp_path / "pretrain.json").read_text()):
        objects = _described(record["conversations"][1]["value"])
        scene = sorted(f"{CELLS.index(cell)}:{color}:{shape}" for color, shape, cell in objects)
        assert "|".join(scene) == scenes[record["image"]]  # every object, nothing else
        if len(objects) > 1:
            cells = [CELLS.index(cell) for _, _, cell in objects]
            in_cell_order.append(cells == sorted(cells))
    assert len(in_cell_order) > 50
    if order == "cells":
        assert all(in_cell_order)
    else:  # 1/2 of two-object and 1/6 of three-object captions come out in cell order by chance
        assert 0.15 < sum(in_cell_order) / len(in_cell_order) < 0.5
    with pytest.raises(ValueError, match="caption_order must be one of"):
        ShapesWorldConfig(caption_order="sorted")


@pytest.mark.parametrize("options", ["random", "fixed"])
def test_side_questions_offer_both_answers_in_the_chosen_order(tmp_path, options):
    from llava_smoe.data.synth import CELLS

    generate_shapes_world(ShapesWorldConfig(seed=3, num_train=200, num_val=0, num_test=0, num_heldout=0, single_turn=True,
                                            side_options=options), tmp_path)
    orders = Counter()
    for record in json.loads((tmp_path / "instruct_train.json").read_text()):
        if "side" not in (record.get("meta") or {}).get("types", []):
            continue
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        color, shape, first, second = re.search(r"Is the (\w+) (\w+) (?:on|at) the (\w+) or the (\w+)\?", question).groups()
        (cell,) = [int(o.split(":")[0]) for o in record["meta"]["scene"].split("|") if o.endswith(f":{color}:{shape}")]
        assert answer in (first, second) and answer in CELLS[cell]  # one of the offered words, and the right one
        orders[(first, second)] += 1
    if options == "fixed":
        assert set(orders) == {("left", "right"), ("top", "bottom")}
    else:
        assert set(orders) == {("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")}
        assert min(orders.values()) >= 0.1 * sum(orders.values())
    with pytest.raises(ValueError, match="side_options must be one of"):
        ShapesWorldConfig(side_options="sorted")


def _answer_from_scene(question: str, scene: str, grid: int, facts: dict | None = None) -> str:
    """Answer a shapes-world question from the scene alone (an independent reader of the layout),
    and lookup questions from the scene and the manifest's table of facts."""
    from llava_smoe.data.synth import CELL_NAMES, COUNT_WORDS

    cells = CELL_NAMES[grid]
    objects = [(int(c), color, shape) for c, color, shape in (o.split(":") for o in scene.split("|"))]
    at = {c: (color, shape) for c, color, shape in objects}
    if question == "How many shapes are there?":
        return COUNT_WORDS[len(objects)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return COUNT_WORDS[sum(color == m[1] for _, color, _ in objects)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return COUNT_WORDS[sum(shape == m[1] for _, _, shape in objects)]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (color,) = [c for _, c, s in objects if s == m[1]]  # asked only when the shape is unique
        return color
    if m := re.fullmatch(r"What is the (\w+) of the (\w+) object\?", question):
        (shape,) = [s for _, c, s in objects if c == m[2]]
        return facts[m[1]][f"{m[2]} {shape}"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (shape,) = [s for _, c, s in objects if c == m[1]]
        return shape
    if m := re.fullmatch(r"What (shape|color) is (?:the shape )?in the (.+)\?", question):
        color, shape = at[cells.index(m[2])]
        return shape if m[1] == "shape" else color
    if m := re.fullmatch(r"What (shape|color) is (?:the shape )?(left of|right of|above|below) the (\w+) (\w+)\?",
                         question):
        (cell,) = [c for c, col, s in objects if (col, s) == (m[3], m[4])]
        row, col = divmod(cell, grid)
        row, col = {"left of": (row, col - 1), "right of": (row, col + 1), "above": (row - 1, col),
                    "below": (row + 1, col)}[m[2]]
        color, shape = at[row * grid + col]
        return shape if m[1] == "shape" else color
    if m := re.fullmatch(r"Is the (\w+) (\w+) (?:on|at) the (\w+) or the (\w+)\?", question):
        (cell,) = [c for c, col, s in objects if (col, s) == (m[1], m[2])]
        row, col = divmod(cell, grid)
        if {m[3], m[4]} == {"left", "right"}:
            return "left" if col < grid / 2 else "right"
        return "top" if row < grid / 2 else "bottom"
    raise AssertionError(f"unknown question {question!r}")


def test_hard_world_is_deterministic_and_every_answer_is_in_the_image(tmp_path):
    from llava_smoe.data.synth import HARD_WORLD

    config = ShapesWorldConfig(seed=4, num_train=300, num_val=30, num_test=60, num_heldout=20, single_turn=True,
                               caption_order="random", **HARD_WORLD)
    generate_shapes_world(config, tmp_path / "a")
    generate_shapes_world(config, tmp_path / "b")
    for name in ("instruct_train.json", "instruct_test.json", "pretrain.json", "text.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a/images/test/000007.png").read_bytes() == (tmp_path / "b/images/test/000007.png").read_bytes()

    seen = Counter()
    for split in ("train", "test", "heldout"):
        for record in json.loads((tmp_path / "a" / f"instruct_{split}.json").read_text()):
            if "meta" not in record:
                continue  # text-only facts
            question = record["conversations"][0]["value"].removeprefix("<image>\n")
            assert _answer_from_scene(question, record["meta"]["scene"], 3) == record["conversations"][1]["value"], record
            seen[record["meta"]["types"][0]] += 1
    assert set(seen) == set(HARD_WORLD["question_types"])  # every type is asked
    with Image.open(tmp_path / "a/images/train/000000.png") as im:
        assert im.size == (48, 48)
    # the original world's questions read the same way
    generate_shapes_world(ShapesWorldConfig(seed=1, num_train=100, num_val=0, num_test=0, num_heldout=0,
                                            single_turn=True), tmp_path / "c")
    for record in json.loads((tmp_path / "c" / "instruct_train.json").read_text()):
        if "meta" in record:
            question = record["conversations"][0]["value"].removeprefix("<image>\n")
            assert _answer_from_scene(question, record["meta"]["scene"], 2) == record["conversations"][1]["value"]


def test_lookup_questions_ask_the_seeds_table_about_an_object_in_the_image(tmp_path):
    from llava_smoe.data.synth import LOOKUP_WORLD

    config = ShapesWorldConfig(seed=3, num_train=400, num_val=0, num_test=60, num_heldout=10, single_turn=True,
                               caption_order="random", **LOOKUP_WORLD)
    generate_shapes_world(config, tmp_path / "a")
    generate_shapes_world(config, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    facts = manifest["lookup"]
    assert len(facts) == 48 and all(len(values) == 4 * 3 for values in facts.values())
    assert {v for values in facts.values() for v in values.values()} == set(LOOKUP_VALUES)

    kinds, values = Counter(), Counter()
    for split in ("train", "test", "heldout"):
        for record in json.loads((tmp_path / "a" / f"instruct_{split}.json").read_text()):
            if "meta" not in record:
                continue
            question = record["conversations"][0]["value"].removeprefix("<image>\n")
            answer = record["conversations"][1]["value"]
            assert _answer_from_scene(question, record["meta"]["scene"], 2, facts) == answer, record
            kinds[record["meta"]["types"][0]] += 1
            if record["meta"]["types"] == ["lookup"]:
                values[answer] += 1
    assert set(kinds) == set(LOOKUP_WORLD["question_types"])
    # Four lookup candidates among about ten: some two fifths of the questions asked.
    assert 0.3 < kinds["lookup"] / sum(kinds.values()) < 0.5
    assert len(values) == len(LOOKUP_VALUES)
    # Another seed, another table; the property names stay.
    other = ShapesWorldConfig(**{**config.to_dict(), "seed": 4})
    generate_shapes_world(other, tmp_path / "c")
    other_facts = json.loads((tmp_path / "c/manifest.json").read_text())["lookup"]
    assert set(other_facts) == set(facts) and other_facts != facts
    for bad in ({"lookup_properties": 0}, {"lookup_questions": 0}):
        with pytest.raises(ValueError, match="lookup_properties must be in"):
            ShapesWorldConfig(**bad)
    # The command line makes the same world.
    assert cli_main(["data", "synth", "--out", str(tmp_path / "cli"), "--seed", "3", "--num-train", "400",
                     "--num-val", "0", "--num-test", "60", "--num-heldout", "10", "--single-turn",
                     "--caption-order", "random", "--lookup"]) == 0
    assert digest(tmp_path / "cli") == digest(tmp_path / "a")


def test_a_world_is_named_once_for_the_command_line_and_study_specs():
    from llava_smoe.config import ConfigError
    from llava_smoe.data.synth import HARD_WORLD, LOOKUP_WORLD, parse_world

    assert parse_world({}) == ShapesWorldConfig()
    hard = parse_world({"world": "hard", "num_train": 50}).to_dict()
    assert hard == ShapesWorldConfig(num_train=50, **HARD_WORLD).to_dict()
    assert parse_world({"world": ["lookup"]}).to_dict() == ShapesWorldConfig(**LOOKUP_WORLD).to_dict()
    # Applied in order, lookup on top of the hard world; the mapping's own fields over both.
    both = parse_world({"world": ["hard", "lookup"], "image_size": 60, "lookup_questions": 2})
    assert both.question_types == [*HARD_WORLD["question_types"], "lookup"] and both.grid == 3
    assert (both.image_size, both.lookup_questions) == (60, 2)
    assert parse_world({"world": "lookup"}).question_types == [*DEFAULT_QUESTION_TYPES, "lookup"]
    assert HARD_WORLD["question_types"][-1] == "color_next_to"  # composing did not change the preset
    for bad, message in (("harder", "synth.world: 'harder' is not a world: ['hard', 'lookup']"),
                         (3, "synth.world: give a world's name or a list of them")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_world({"world": bad}, ("synth",))
    with pytest.raises(ConfigError, match=re.escape("unknown key 'synth.gird'")):
        parse_world({"world": "hard", "gird": 4}, ("synth",))


@pytest.mark.parametrize("world", ["single", "scatter"])
def test_held_out_worlds_are_deterministic_and_answerable(tmp_path, world):
    from llava_smoe.data.worlds import WorldConfig, generate_world

    config = WorldConfig(world=world, seed=1, num_train=200, num_val=0, num_test=50)
    generate_world(config, tmp_path / "a")
    manifest = generate_world(config, tmp_path / "b")
    assert (tmp_path / "a/instruct_train.json").read_bytes() == (tmp_path / "b/instruct_train.json").read_bytes()
    assert (tmp_path / "a/images/test/000003.png").read_bytes() == (tmp_path / "b/images/test/000003.png").read_bytes()
    records = json.loads((tmp_path / "a/instruct_train.json").read_text())
    assert len(records) == 200 and (tmp_path / "a/pretrain.json").is_file() == (world == "scatter")
    for r in records:
        question, answer = r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"]
        objects = [o.split(":") for o in r["meta"]["scene"].split("|")]
        if world == "single":
            (color, shape), = objects
            expected = {"What color is the shape?": color, "What shape is it?": shape}.get(question)
            if expected is None and (m := re.fullmatch(r"Is there a (\w+) shape\?", question)):
                expected = "yes" if m[1] == color else "no"
            if expected is None and (m := re.fullmatch(r"Is there a (\w+)\?", question)):
                expected = "yes" if m[1] == shape else "no"
        else:
            xs = {(c, s): int(x) for x, c, s in objects}
            if question == "How many shapes are there?":
                expected = {2: "two", 3: "three", 4: "four"}[len(objects)]
            elif m := re.fullmatch(r"What color is the (\w+)\?", question):
                (expected,) = [c for _, c, s in objects if s == m[1]]
            elif m := re.fullmatch(r"What shape is the (\w+) one\?", question):
                (expected,) = [s for _, c, s in objects if c == m[1]]
            else:
                m = re.fullmatch(r"Which is further left, the (\w+) (\w+) or the (\w+) (\w+)\?", question)
                a, b = (m[1], m[2]), (m[3], m[4])
                expected = (a if xs[a] < xs[b] else b)[1]
        assert expected == answer, r
    kinds = manifest["question_types"]["train"]
    if world == "single":  # three in four questions are yes/no, half of those "no"
        yes_no = [r for r in records if r["meta"]["types"][0].startswith("yes_")]
        assert 0.65 < len(yes_no) / len(records) < 0.85
        assert 0.4 < sum(r["conversations"][1]["value"] == "no" for r in yes_no) / len(yes_no) < 0.6
    else:
        assert set(kinds) == {"count", "color_of_shape", "shape_of_color", "further_left"}
