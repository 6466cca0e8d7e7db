"""lmms-eval integration: the `llava_smoe` model class, a real evaluator run found by name
through the entry point, and `llava-smoe eval --compare`. All offline, on local parquet tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from eval_fixtures import tiny_loaded, tiny_setup  # noqa: F401  (fixtures)
from PIL import Image

pytestmark = pytest.mark.slow

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def _instance(request_type, args, doc_id, task="shapes"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def lmms_with_docs(tiny_loaded, tiny_setup):
    from llava_smoe.evaluation.lmms_model import LlavaSmoeLmms
    from llava_smoe.evaluation.questions import load_questions

    model, processor = tiny_loaded
    items = load_questions(tiny_setup.test_json)[:4]
    docs = [{"question": it.question, "answer": it.answer, "image": Image.open(it.image_path)} for it in items]
    docs.append({"question": "How many sides does a square have?", "answer": "four", "image": None})
    lm = LlavaSmoeLmms(model=model, processor=processor, device="cpu", batch_size=3, max_new_tokens=5)
    lm.task_dict = {"shapes": {"test": docs}}
    return lm, docs


def _visual(doc):
    return [] if doc["image"] is None else [doc["image"]]


def test_generate_until_batches_and_honours_until(lmms_with_docs):
    from llava_smoe.evaluation.generation import Prompt
    from llava_smoe.inference import SamplingParams

    lm, docs = lmms_with_docs
    greedy = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
    requests = [_instance("generate_until", (d["question"], dict(greedy), _visual, i, "shapes", "test"), i)
                for i, d in enumerate(docs)]
    batched = lm.generate_until(requests)
    lm.batch_size_per_device = 1
    try:
        single = lm.generate_until(requests)
    finally:
        lm.batch_size_per_device = 3
    assert batched == single and len(batched) == len(docs)
    prompts = [Prompt(d["question"], _visual(d)) for d in docs]
    expected = lm.runner.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert batched == expected
    # `until` ends the answer before the stop string
    long_answer = next(a for a in batched if len(a) >= 3)
    i = batched.index(long_answer)
    stop = long_answer[1:3]
    (cut,) = lm.generate_until([_instance("generate_until", (docs[i]["question"], {**greedy, "until": [stop]},
                                                              _visual, i, "shapes", "test"), i)])
    assert cut == long_answer[: long_answer.find(stop)].strip()


def test_a_docs_image_position_places_its_image(lmms_with_docs):
    """The local tasks' parquet says where each record put its image; the model prompts so, and a
    doc without the column is left to the processor."""
    lm, docs = lmms_with_docs
    doc, question = docs[0], docs[0]["question"]
    lm.task_dict["placed"] = {"test": [{**doc, "image_position": "last"}, {**doc, "image_position": "first"}, doc]}
    last, first, unplaced = (lm._prompt(question, _visual, i, "placed", "test") for i in range(3))
    placeholder = lm.runner.processor.config.image_token
    assert (last.text, first.text, unplaced.text) == (f"{question}\n{placeholder}", f"{placeholder}\n{question}", question)
    ids_last, ids_first = (lm.runner.encode_prompt(p).tolist() for p in (last, first))
    assert ids_first == lm.runner.encode_prompt(unplaced).tolist() != ids_last  # this processor places first
    assert sorted(ids_first) == sorted(ids_last)


def test_loglikelihood_uses_the_runner_scores(lmms_with_docs):
    from llava_smoe.evaluation.generation import Prompt

    lm, docs = lmms_with_docs
    requests = [_instance("loglikelihood", (d["question"], d["answer"], _visual, i, "shapes", "test"), i)
                for i, d in enumerate(docs)]
    got = lm.loglikelihood(requests)
    expected = lm.runner.loglikelihood([Prompt(d["question"], _visual(d)) for d in docs], [d["answer"] for d in docs],
                                       batch_size=1)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert all(lp < 0 for lp, _ in got)


def test_model_args_and_multi_round_errors(lmms_with_docs):
    from llava_smoe.evaluation.lmms_model import LlavaSmoeLmms

    lm, _ = lmms_with_docs
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="unknown key 'model_args.temprature'"):
        LlavaSmoeLmms(pretrained="x", temprature=0)
    with pytest.raises(ValueError, match="pretrained=PATH"):
        LlavaSmoeLmms()


def test_entry_point_resolves_by_name():
    from lmms_eval.models import get_model

    from llava_smoe.evaluation.lmms_model import LlavaSmoeLmms

    assert get_model("llava_smoe") is LlavaSmoeLmms


def test_lmms_eval_cli_runs_local_task_offline(tiny_setup, tmp_path):
    """The documented command: `python -m lmms_eval --model llava_smoe ...` on the shapes task."""
    from llava_smoe.evaluation.questions import export_parquet, load_questions
    from llava_smoe.evaluation.tasks import write_task_folder

    parquet = export_parquet(load_questions(tiny_setup.test_json), str(tmp_path / "shapes_test.parquet"))
    tasks = write_task_folder(str(tmp_path / "tasks"), {"llava_smoe_shapes": parquet})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_smoe",
           "--model_args", f"pretrained={tiny_setup.checkpoint},device=cpu,dtype=float32",
           "--include_path", tasks, "--tasks", "llava_smoe_shapes", "--limit", "3", "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["llava_smoe_shapes"]["vqa_accuracy,none"] <= 1.0
    assert results["n-samples"]["llava_smoe_shapes"]["effective"] == 3
    (samples_file,) = out.rglob("*_samples_llava_smoe_shapes.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 3 and all("vqa_accuracy" in s for s in samples)


def test_llava_smoe_eval_compare_writes_results_and_table(tiny_setup, tmp_path, capsys):
    from llava_smoe.cli import main

    twin = tmp_path / "twin"
    shutil.copytree(tiny_setup.checkpoint, twin)
    out = tmp_path / "eval"
    code = main(["eval", tiny_setup.checkpoint, "--compare", str(twin), "--tasks", "llava_smoe_vqa",
                 "--data", tiny_setup.test_json, "--limit", "2", "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    table = (out / "results.md").read_text()
    assert "| task | metric | ckpt | twin |" in table and "| llava_smoe_vqa | vqa_accuracy |" in table
    assert table in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    scores = [summary["results"][label]["llava_smoe_vqa/vqa_accuracy"] for label in ("ckpt", "twin")]
    assert scores[0] == scores[1]  # same weights, same answers
    for label in ("ckpt", "twin"):
        assert (out / label / "results.json").is_file()
        lines = (out / label / "samples_llava_smoe_vqa.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert json.loads(lines[0])["arguments"][0].endswith("Answer the question using a single word or phrase.")
    assert (out / "data" / "instruct_test.parquet").is_file()
    assert str(out / "data" / "instruct_test.parquet") in (out / "tasks" / "llava_smoe_vqa.yaml").read_text()


def _broken_task_folder(tmp_path) -> str:
    """A local task over a parquet file without the `question` column its doc_to_text reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_smoe.evaluation.tasks import LOCAL_TASKS, task_yaml

    data = tmp_path / "no_question.parquet"
    pq.write_table(pa.table({"prompt": ["what colour?"], "answer": ["red"]}), data)
    folder = tmp_path / "broken_tasks"
    folder.mkdir()
    text = task_yaml(LOCAL_TASKS["llava_smoe_vqa"], str(data)).replace("task: llava_smoe_vqa", "task: broken_vqa")
    (folder / "broken_vqa.yaml").write_text(text)
    return str(folder)


def test_llava_smoe_eval_fails_when_lmms_eval_fails(tiny_setup, tmp_path, capsys):
    from llava_smoe.cli import main

    out = tmp_path / "eval"
    code = main(["eval", tiny_setup.checkpoint, "--tasks", "broken_vqa", "--include-path", _broken_task_folder(tmp_path),
                 "--limit", "1", "--device", "cpu", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: lmms-eval failed on ") and "KeyError: 'question'" in err
    assert not (out / "results.md").exists() and not (out / "summary.json").exists()


def test_llava_smoe_eval_fails_on_logged_errors_and_missing_results(tiny_setup, tmp_path, monkeypatch, capsys):
    """lmms-eval also reports failures in its log and returns whatever it has: both are errors here."""
    import lmms_eval.evaluator
    from loguru import logger

    from llava_smoe.cli import main

    outcomes = iter([("a task's documents could not be loaded", {"results": {"llava_smoe_vqa": {}}}),
                     (None, {"results": {}}), (None, None)])

    def fake_simple_evaluate(**kwargs):
        message, results = next(outcomes)
        if message:
            logger.error(message)
        return results

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", fake_simple_evaluate)
    expected = ["reported 1 error(s) on", "wrote no results for task(s) ['llava_smoe_vqa']", "returned no results"]
    for i, fragment in enumerate(expected):
        code = main(["eval", tiny_setup.checkpoint, "--tasks", "llava_smoe_vqa", "--data", tiny_setup.test_json,
                     "--device", "cpu", "--out", str(tmp_path / f"eval{i}")])
        assert code == 1
        assert fragment in capsys.readouterr().err
