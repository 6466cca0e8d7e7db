"""`llava-smoe probe`: teacher-forced word accuracy per group of words, with the image and blind."""

from __future__ import annotations

import json
import os

import pytest
from eval_fixtures import tiny_loaded, tiny_setup  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from llava_smoe.evaluation.generation import ContinuationScore, InferenceRunner
from llava_smoe.evaluation.questions import load_questions
from llava_smoe.evaluation.word_probe import probe_words, token_words


def _captions(setup):
    return os.path.join(setup.data_dir, "captions_test.json")


def test_synth_writes_test_captions_naming_each_test_scene(tiny_setup):
    with open(_captions(tiny_setup)) as f:
        captions = json.load(f)
    with open(tiny_setup.test_json) as f:
        questions = json.load(f)
    assert len(captions) == 6  # num_test images, one caption each
    scenes = {r["image"]: r["meta"]["scene"] for r in questions}
    for record in captions:
        assert record["meta"]["scene"] == scenes[record["image"]]
        caption = record["conversations"][1]["value"]
        for obj in record["meta"]["scene"].split("|"):
            _, color, shape = obj.split(":")
            assert f"{color} {shape}" in caption


def test_token_words_maps_each_word_to_the_tokens_that_spell_it(tiny_setup):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_setup.data_dir, "tokenizer"))
    text = "There are two shapes: a red circle in the top left and a blue square."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = token_words(tokenizer, ids)
    assert [w for w, _ in words] == ["there", "are", "two", "shapes", "a", "red", "circle", "in", "the", "top",
                                     "left", "and", "a", "blue", "square"]
    for word, spelled in words:
        assert spelled == sorted(spelled) and spelled
        assert tokenizer.decode([ids[j] for j in spelled]).strip().lower().rstrip(":.") == word


def test_probe_counts_a_word_right_only_when_all_its_tokens_are(tiny_loaded, tiny_setup, monkeypatch):
    model, processor = tiny_loaded
    items = load_questions(_captions(tiny_setup))[:2]
    tokenizer = processor.tokenizer
    real = InferenceRunner.continuation_scores
    expected = {False: {}, True: {}}  # blind -> word -> [hits, count], computed here by hand

    def scripted(self, prompts, continuations):
        scores = real(self, prompts, continuations)
        out = []
        for prompt, score in zip(prompts, scores):
            blind = prompt.images[0].getcolors() is not None and len(prompt.images[0].getcolors()) == 1
            # Right on every token but the last of each word with an even position (with the
            # image), on every token of "circle" alone (blind).
            greedy = [True] * len(score.token_ids)
            words = token_words(tokenizer, score.token_ids)
            for position, (word, spelled) in enumerate(words):
                if blind:
                    for j in spelled:
                        greedy[j] = greedy[j] and word == "circle"
                elif position % 2 == 0:
                    greedy[spelled[-1]] = False
            for word, spelled in words:
                tally = expected[blind].setdefault(word, [0, 0])
                tally[0] += all(greedy[j] for j in spelled)
                tally[1] += 1
            out.append(ContinuationScore(score.token_ids, score.logprobs, greedy))
        return out

    monkeypatch.setattr(InferenceRunner, "continuation_scores", scripted)
    colors, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
    result = probe_words(model, processor, items, {"color": colors, "shape": shapes}, batch_size=1)
    for name, words in (("color", colors), ("shape", shapes)):
        hits = sum(expected[False].get(w, [0, 0])[0] for w in words)
        hits_blind = sum(expected[True].get(w, [0, 0])[0] for w in words)
        count = sum(expected[False].get(w, [0, 0])[1] for w in words)
        assert count > 0
        assert result.groups[name].count == count
        assert result.groups[name].accuracy == pytest.approx(hits / count)
        assert result.groups[name].blind_accuracy == pytest.approx(hits_blind / count)
    if "circle" in result.words:
        assert result.words["circle"].blind_accuracy == 1.0
    assert set(result.words) <= set(colors) | set(shapes)


def test_probe_token_loss_is_the_mean_negative_log_likelihood(tiny_loaded, tiny_setup):
    model, processor = tiny_loaded
    items = load_questions(_captions(tiny_setup))[:3]
    result = probe_words(model, processor, items, {"shape": ["circle", "square", "triangle"]}, batch_size=2)
    from llava_smoe.evaluation.generation import Prompt
    from llava_smoe.processing.images import load_image

    runner = InferenceRunner(model, processor)
    scores = runner.continuation_scores([Prompt(it.question, [load_image(it.image_path)]) for it in items],
                                        [it.answer for it in items])
    tokens = sum(len(s.token_ids) for s in scores)
    assert result.token_loss == pytest.approx(-sum(sum(s.logprobs) for s in scores) / tokens, rel=1e-4)
    assert result.num_items == 3


def test_probe_rejects_groups_absent_from_the_references(tiny_loaded, tiny_setup):
    model, processor = tiny_loaded
    items = load_questions(_captions(tiny_setup))[:2]
    with pytest.raises(ValueError, match="no word of any group"):
        probe_words(model, processor, items, {"size": ["huge", "tiny"]})
    with pytest.raises(ValueError, match="non-empty group"):
        probe_words(model, processor, items, {"size": []})


def test_probe_command_reads_the_manifest_groups(tiny_setup, tmp_path, capsys):
    from llava_smoe.cli import main

    out = tmp_path / "probe.json"
    assert main(["probe", tiny_setup.checkpoint, "--data", _captions(tiny_setup), "--manifest",
                 os.path.join(tiny_setup.data_dir, "manifest.json"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["groups"]) == {"color", "shape"} and result["num_items"] == 6
    # every caption names each of its objects' colour and shape once
    with open(_captions(tiny_setup)) as f:
        objects = sum(len(r["meta"]["scene"].split("|")) for r in json.load(f))
    assert result["groups"]["color"]["count"] == result["groups"]["shape"]["count"] == objects
    assert "color:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --group"):
        main(["probe", tiny_setup.checkpoint, "--data", _captions(tiny_setup)])
