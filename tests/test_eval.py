"""Evaluation without lmms-eval: VQA normalisation, question export, task YAMLs, batched
generation, continuation scoring, the exact-match evaluator and routing analysis."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import tiny_loaded, tiny_setup  # noqa: F401  (fixtures)
from PIL import Image

from llava_smoe.evaluation import evaluate_exact_match
from llava_smoe.evaluation.generation import (
    InferenceRunner,
    Prompt,
    sampling_from_gen_kwargs,
    sorted_batches,
)
from llava_smoe.inference import SamplingParams
from llava_smoe.evaluation.questions import (
    QAItem,
    export_parquet,
    flatten_records,
    load_questions,
)
from llava_smoe.evaluation.tasks import (
    LOCAL_TASKS,
    doc_to_text,
    process_results,
    task_yaml,
    write_task_folder,
)
from llava_smoe.evaluation.vqa import normalize_answer, vqa_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- VQA normalisation -----------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),
    ("  The Red Circle!", "red circle"),
    ("an apple", "apple"),
    ("three", "3"),
    ("2.5", "2.5"),
    ("Yes\n", "yes"),
    ("isnt", "isn't"),
    ("t-shirt", "t shirt"),
    ("left, right", "left right"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_rules():
    assert vqa_accuracy("Three.", "3") == 1.0
    assert vqa_accuracy("red\nbecause it is red", "red") == 1.0  # first line only
    assert vqa_accuracy("blue", "red") == 0.0
    ten = ["2"] * 2 + ["3"] * 8  # VQA consensus: min(1, matches / 3)
    assert vqa_accuracy("two", ten) == pytest.approx(2 / 3)
    assert vqa_accuracy("3", ten) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


# -- questions and export --------------------------------------------------------------------------
def test_flatten_records_one_item_per_turn_with_types(tiny_setup):
    with open(tiny_setup.test_json) as f:
        records = json.load(f)
    items = load_questions(tiny_setup.test_json)  # image folder found next to the file
    assert len(items) == sum(len(r["conversations"]) // 2 for r in records)
    first = records[0]
    mine = [it for it in items if it.question_id.split("#")[0] == first["id"]]
    assert [it.question_type for it in mine] == first["meta"]["types"]
    assert [it.answer for it in mine] == [t["value"] for t in first["conversations"][1::2]]
    assert all("<image>" not in it.question and os.path.isfile(it.image_path) for it in mine)


def test_evaluation_prompts_keep_an_image_placed_after_the_question(tiny_loaded, tiny_setup):
    model, processor = tiny_loaded
    with open(tiny_setup.test_json) as f:
        record = json.load(f)[0]
    record = {**record, "conversations": record["conversations"][:2], "meta": {}}  # its first question
    question = record["conversations"][0]["value"].removeprefix("<image>\n")
    moved = {**record, "conversations": [{"from": "human", "value": question + "\n<image>"},
                                         record["conversations"][1]]}
    folder = os.path.join(tiny_setup.data_dir, "images")
    (first,), (last,) = flatten_records([record], folder), flatten_records([moved], folder)
    assert first.question == last.question == question
    assert (first.image_position, last.image_position) == ("first", "last")
    runner = InferenceRunner(model, processor)
    image = [Image.open(first.image_path).convert("RGB")]
    ids_first = runner.encode_prompt(Prompt(first.prompt_text(), image)).tolist()
    ids_last = runner.encode_prompt(Prompt(last.prompt_text(), image)).tolist()
    assert ids_first == runner.encode_prompt(Prompt(question, image)).tolist()  # where prompts put images by default
    image_at = [i for i, t in enumerate(ids_last) if t == processor.image_token_id]
    # The image tokens end the user turn, a fixed few tokens before the answer; first, they open it.
    assert len(image_at) == processor.num_image_tokens and sorted(ids_first) == sorted(ids_last)
    last_in_first = max(i for i, t in enumerate(ids_first) if t == processor.image_token_id)
    question_len = len(processor.tokenizer(question, add_special_tokens=False)["input_ids"])
    tail_first, tail_last = len(ids_first) - last_in_first, len(ids_last) - image_at[-1]
    assert tail_last < 8 and tail_first - tail_last >= question_len  # the question moved before the image


def test_flatten_records_rejects_bad_records_with_location(tmp_path):
    bad = [{"id": "x", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                {"from": "gpt", "value": "a"}]}]
    with pytest.raises(ValueError, match=r"record #0 \(id='x'\).*does not exist"):
        flatten_records(bad, str(tmp_path), source="bad.json")


def test_export_parquet_round_trips_with_image_feature(tiny_setup, tmp_path):
    import datasets

    items = load_questions(tiny_setup.test_json)
    text_only = QAItem("t0", "How many sides does a square have?", "four", None, "fact")
    path = export_parquet([*items, text_only], str(tmp_path / "q.parquet"))
    ds = datasets.load_dataset("parquet", data_files={"test": path}, split="test")
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == len(items) + 1
    row = ds[0]
    assert row["question"] == items[0].question and row["answer"] == items[0].answer
    assert [r["image_position"] for r in ds] == [it.image_position for it in [*items, text_only]]
    with Image.open(items[0].image_path) as original:
        assert list(row["image"].convert("RGB").getdata()) == list(original.convert("RGB").getdata())
    assert ds[len(items)]["image"] is None


def test_export_cli_flag(tiny_setup, tmp_path, capsys):
    from llava_smoe.cli import main

    out = tmp_path / "shapes_test.parquet"
    assert main(["eval", "--export-parquet", str(out), "--data", tiny_setup.test_json]) == 0
    assert out.is_file() and "questions" in capsys.readouterr().out


# -- task definitions ------------------------------------------------------------------------------
def test_eval_folder_yamls_are_the_generated_ones():
    for name, task in LOCAL_TASKS.items():
        with open(os.path.join(REPO, "eval", f"{name}.yaml")) as f:
            assert f.read() == task_yaml(task), f"eval/{name}.yaml is stale: regenerate it with task_yaml()"


def load_task_yaml(path):
    """The YAML with `!function` references kept as their dotted names."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "function:" + loader.construct_scalar(node))
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


def test_task_yaml_is_offline_and_resolved(tmp_path):
    folder = write_task_folder(str(tmp_path / "tasks"), {"llava_smoe_vqa": "data/x.parquet"})
    cfg = load_task_yaml(os.path.join(folder, "llava_smoe_vqa.yaml"))
    assert cfg["dataset_path"] == "parquet"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == os.path.abspath("data/x.parquet")
    assert cfg["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == (
        "\nAnswer the question using a single word or phrase.")
    shapes = load_task_yaml(os.path.join(folder, "llava_smoe_shapes.yaml"))
    assert shapes["dataset_kwargs"]["data_files"]["test"] == LOCAL_TASKS["llava_smoe_shapes"].default_data
    assert shapes["doc_to_text"] == "function:llava_smoe.evaluation.tasks.doc_to_text"
    assert shapes["generation_kwargs"]["until"] == ["\n"]
    with pytest.raises(ValueError, match="no local task named"):
        write_task_folder(str(tmp_path / "t2"), {"gqa": "x.parquet"})


def test_document_functions():
    doc = {"question": "What color?", "answer": "Red", "image": None}
    assert doc_to_text(doc, {"pre_prompt": "", "post_prompt": "\nShort."}) == "What color?\nShort."
    assert process_results(doc, ["red."]) == {"vqa_accuracy": 1.0}
    assert process_results({**doc, "answer": ["blue", "red"]}, ["red"]) == {"vqa_accuracy": 1.0}


# -- generation ------------------------------------------------------------------------------------
def test_gen_kwargs_become_sampling_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_from_gen_kwargs({"max_new_tokens": -1})
    with pytest.raises(ValueError, match="top_p"):
        sampling_from_gen_kwargs({"temperature": 0.5, "top_p": 1.5})
    o = sampling_from_gen_kwargs({"until": "\n", "temperature": 0, "top_p": 0.9, "num_beams": 1,
                                  "image_aspect_ratio": "pad"}, default_max_new_tokens=7)
    assert (o.stop, o.temperature, o.top_p, o.max_new_tokens) == (("\n",), 0.0, 1.0, 7)
    assert sampling_from_gen_kwargs({"temperature": 0.7, "top_p": 0.9}).top_p == 0.9
    assert sampling_from_gen_kwargs({"until": ["</s>", ""], "do_sample": False, "temperature": 0.7}).stop == ("</s>",)
    assert sampling_from_gen_kwargs({"do_sample": False, "temperature": 0.7}).temperature == 0.0
    with pytest.raises(ValueError, match="beam search is not supported"):
        sampling_from_gen_kwargs({"num_beams": 2})
    assert list(sorted_batches([1, 5, 3, 5], 2)) == [[1, 3], [2, 0]]


def _prompts(setup, n=3):
    items = load_questions(setup.test_json)[:n]
    prompts = [Prompt(it.question, [Image.open(it.image_path).convert("RGB")]) for it in items]
    prompts.append(Prompt("How many sides does a triangle have?"))  # text-only, shorter
    return prompts


def test_batched_and_unbatched_greedy_answers_are_identical(tiny_setup, tiny_loaded):
    runner = InferenceRunner(*tiny_loaded)
    prompts = _prompts(tiny_setup)
    options = SamplingParams(max_new_tokens=3, temperature=0.0)
    batched = runner.generate(prompts, options, batch_size=3)
    single = runner.generate(prompts, options, batch_size=1)
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_stop_strings_cut_the_answer(tiny_loaded, tiny_setup):
    runner = InferenceRunner(*tiny_loaded)
    prompt = _prompts(tiny_setup, 1)[:1]
    full = runner.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = runner.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.0, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)].strip()


def test_loglikelihood_matches_direct_computation(tiny_loaded, tiny_setup):
    model, processor = tiny_loaded
    runner = InferenceRunner(model, processor)
    prompts = _prompts(tiny_setup, 2)  # two with an image, one text-only
    continuations = ["red", "three sides", "left"]
    scored = runner.loglikelihood(prompts, continuations, batch_size=3)
    for prompt, cont, (logprob, greedy) in zip(prompts, continuations, scored):
        prompt_ids = runner.encode_prompt(prompt)
        cont_ids = torch.tensor(processor.tokenizer(cont, add_special_tokens=False)["input_ids"])
        ids = torch.cat([prompt_ids, cont_ids])[None]
        pixels = processor.preprocess_images(prompt.images) if prompt.images else None
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0].float()
        logprobs = F.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        expected = logprobs.gather(1, cont_ids[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == cont_ids).all())


def test_loglikelihood_greedy_flag_true_for_the_argmax_token(tiny_loaded, tiny_setup):
    model, processor = tiny_loaded
    runner = InferenceRunner(model, processor)
    prompt = _prompts(tiny_setup, 1)[0]
    ids = runner.encode_prompt(prompt)[None]
    with torch.no_grad():
        top = model(input_ids=ids, pixel_values=processor.preprocess_images(prompt.images)).logits[0, -1].argsort(
            descending=True)
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    # The best token whose text encodes back to itself; greedy only when it is the argmax.
    for rank, token_id in enumerate(top.tolist()):
        text = tok.decode([token_id])
        if token_id not in special and tok(text, add_special_tokens=False)["input_ids"] == [token_id]:
            break
    (_, greedy), = runner.loglikelihood([prompt], [text])
    assert greedy == (rank == 0)


# -- exact match -----------------------------------------------------------------------------------
def test_exact_match_evaluator_scores_and_groups_by_type(tiny_setup, tiny_loaded, monkeypatch):
    with open(tiny_setup.test_json) as f:
        records = json.load(f)[:3]
    image_folder = os.path.join(tiny_setup.data_dir, "images")
    items = flatten_records(records, image_folder)
    seen_images: list = []

    def fake_generate(self, prompts, options, batch_size=8):
        seen_images.extend(im for p in prompts for im in p.images)
        # answer correctly on even questions
        return [it.answer.upper() + "." if i % 2 == 0 else "nonsense" for i, it in enumerate(items)]

    monkeypatch.setattr(InferenceRunner, "generate", fake_generate)
    model, processor = tiny_loaded
    result = evaluate_exact_match(model, processor, records, image_folder, blind=False)
    assert result.num_questions == len(items)
    assert result.accuracy == pytest.approx(sum(1 for i in range(len(items)) if i % 2 == 0) / len(items))
    assert set(result.per_type) == {it.question_type for it in items}
    assert sum(result.per_type_count.values()) == len(items)
    assert [p["correct"] for p in result.predictions] == [i % 2 == 0 for i in range(len(items))]

    seen_images.clear()
    evaluate_exact_match(model, processor, records, image_folder, blind=True)
    mean = processor.image_config.mean_color
    assert seen_images and all(set(im.getdata()) == {mean} for im in seen_images)


def test_exact_match_evaluator_runs_the_model(tiny_setup, tiny_loaded):
    with open(tiny_setup.test_json) as f:
        records = json.load(f)[:2]
    model, processor = tiny_loaded
    result = evaluate_exact_match(model, processor, records, os.path.join(tiny_setup.data_dir, "images"),
                                  batch_size=4, max_new_tokens=2)
    assert 0.0 <= result.accuracy <= 1.0
    assert len(result.predictions) == result.num_questions == sum(len(r["conversations"]) // 2 for r in records)
    assert json.loads(json.dumps(result.to_dict()))["num_questions"] == result.num_questions


# -- routing analysis ------------------------------------------------------------------------------
def test_inspect_writes_json_and_png(tiny_setup, tmp_path, capsys):
    from llava_smoe.cli import main

    out = tmp_path / "inspect"
    assert main(["inspect", tiny_setup.checkpoint, "--data", tiny_setup.test_json, "--limit", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["num_samples"] == 2 and report["summary"]["moe_layers"] == 2
    n_text, n_image = report["num_tokens"]["text"], report["num_tokens"]["image"]
    assert n_image == 2 * 16
    for layer in report["layers"].values():
        k = layer["top_k"]
        assert sum(layer["tokens_per_expert_text"]) == k * n_text
        assert sum(layer["tokens_per_expert_image"]) == k * n_image
        assert layer["dead_experts"] == sum(c == 0 for c in layer["tokens_per_expert"])
        assert 0.0 <= layer["router_entropy_normalized"] <= 1.0 + 1e-6
        agreement = layer["competition_agreement"]
        assert agreement["image"]["tokens"] == n_image and agreement["text"]["tokens"] == n_text
        assert 0.0 <= agreement["all"]["topk_overlap"] <= 1.0
    png = (out / "routing_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert width > 300 and height > 100


def test_competition_probe_agrees_with_a_direct_computation(tiny_loaded):
    """The probe's top-k overlap equals router top-k vs competition top-k computed by hand."""
    from llava_smoe.evaluation.routing import CompetitionProbe
    from llava_smoe.moe import moe_layers
    from llava_smoe.moe.routers.competesmoe import neural_response

    model, _ = tiny_loaded
    name, layer = moe_layers(model)[0]
    x_TD = torch.randn(10, layer.hidden_size)
    probe = CompetitionProbe([(name, layer)])
    with probe, torch.no_grad():
        layer(x_TD)
    (stats,) = probe.summary().values()
    affinity = neural_response(layer.experts.forward_all(x_TD), layer.router.opts.affinity)
    router_idx = layer.router.gate(x_TD).expert_idx_TK
    comp_idx = affinity.topk(layer.config.top_k, dim=-1).indices
    expected = torch.tensor([len(set(r.tolist()) & set(c.tolist())) / layer.config.top_k
                             for r, c in zip(router_idx, comp_idx)]).mean().item()
    assert stats["all"]["tokens"] == 10
    assert stats["all"]["topk_overlap"] == pytest.approx(expected)


def test_inspect_rejects_dense_models(tiny_setup, tmp_path):
    from llava_smoe.evaluation.routing import analyze_routing

    class Dense(torch.nn.Linear):
        pass

    with pytest.raises(ValueError, match="no MoE layers"):
        analyze_routing(Dense(2, 2), None, tiny_setup.test_json)


# -- the eval harness (no lmms-eval run) -----------------------------------------------------------
def test_checkpoint_labels_are_short_and_unique():
    from llava_smoe.evaluation.harness import checkpoint_labels

    assert checkpoint_labels(["/r/smoe/final", "/r/compete/final"]) == ["smoe_final", "compete_final"]
    assert checkpoint_labels(["/r/a", "/r/b"]) == ["a", "b"]


def test_metric_rows_and_markdown_table():
    from llava_smoe.evaluation.harness import markdown_table, metric_rows

    results = {"results": {"pope": {"alias": "pope", "pope_accuracy,none": 0.5, "pope_accuracy_stderr,none": "N/A",
                                    "pope_f1_score,none": 0.25},
                           "gqa": {"exact_match,flexible": 0.75}}}
    rows = metric_rows(results)
    assert rows == {("pope", "pope_accuracy"): 0.5, ("pope", "pope_f1_score"): 0.25,
                    ("gqa", "exact_match (flexible)"): 0.75}
    table = markdown_table({"a": rows, "b": {("gqa", "exact_match (flexible)"): 1.0}})
    lines = table.splitlines()
    assert lines[0] == "| task | metric | a | b |"
    assert "| gqa | exact_match (flexible) | 0.7500 | 1.0000 |" in lines
    assert "| pope | pope_accuracy | 0.5000 |  |" in lines


def test_eval_config_errors_say_what_to_fix(tiny_setup, tmp_path, monkeypatch):
    from llava_smoe.evaluation.harness import EvalConfig, prepare_tasks

    ckpt, out = tiny_setup.checkpoint, str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EvalConfig([str(tmp_path)], ["gqa"], out)
    with pytest.raises(ValueError, match="--tasks is empty"):
        EvalConfig([ckpt], [" "], out)
    with pytest.raises(ValueError, match="only read by the local tasks"):
        EvalConfig([ckpt], ["gqa"], out, data=tiny_setup.test_json)
    with pytest.raises(ValueError, match="--limit"):
        EvalConfig([ckpt], ["gqa"], out, limit=0)
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["x"]}), bad)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['question', 'answer'\]"):
        prepare_tasks(EvalConfig([ckpt], ["llava_smoe_vqa"], out, data=str(bad)))
    monkeypatch.chdir(tmp_path)  # the default data path is relative to the working directory
    with pytest.raises(FileNotFoundError, match="pass --data FILE"):
        prepare_tasks(EvalConfig([ckpt], ["llava_smoe_vqa"], out))
