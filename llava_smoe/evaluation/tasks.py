"""Offline lmms-eval tasks over local parquet files: their YAML and their document functions.

The YAML files in the repository's `eval/` folder are `task_yaml(...)` with the default data
paths (a test keeps them in sync); `llava-smoe eval` writes copies pointing at the files it is
given, so nothing depends on the working directory. The YAMLs name the document functions
below by their module path (lmms-eval imports them); they need no lmms-eval import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from llava_smoe.evaluation.vqa import vqa_accuracy

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "\nAnswer with the option's letter from the given choices directly."
FUNCTIONS_MODULE = "llava_smoe.evaluation.tasks"


@dataclass(frozen=True)
class LocalTask:
    name: str
    default_data: str  # relative to the working directory (the repository root)
    post_prompt: str
    description: str


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask(
            "llava_smoe_shapes", "playground/data/shapes/instruct_test.parquet", "",
            "synthetic shapes-world test split (bare questions, as in its training data)",
        ),
        LocalTask(
            "llava_smoe_vqa", "playground/data/local_vqa.parquet", SHORT_ANSWER_PROMPT,
            "any local question/answer parquet file, scored with VQA normalisation",
        ),
    )
}


def task_yaml(task: LocalTask, data_file: str | None = None, max_new_tokens: int = 16) -> str:
    """The lmms-eval YAML of a local task reading `data_file` (default: the task's own)."""
    data = data_file or task.default_data
    return f"""\
# {task.description}
# Run: lmms-eval --model llava_smoe --model_args pretrained=CKPT --include_path eval/ --tasks {task.name}
# or:  llava-smoe eval CKPT --tasks {task.name} --data FILE --out DIR   (FILE: LLaVA JSON or parquet)
task: {task.name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
output_type: generate_until
doc_to_visual: !function {FUNCTIONS_MODULE}.doc_to_visual
doc_to_text: !function {FUNCTIONS_MODULE}.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
  until: ["\\n"]
process_results: !function {FUNCTIONS_MODULE}.process_results
metric_list:
  - metric: vqa_accuracy
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(task.post_prompt)}
metadata:
  version: 1
"""


def write_task_folder(folder: str, data_files: dict[str, str] | None = None) -> str:
    """Write every local task's YAML (reading `data_files[name]` where given) into `folder`,
    for `--include_path folder`. Returns `folder`."""
    data_files = data_files or {}
    unknown = set(data_files) - set(LOCAL_TASKS)
    if unknown:
        raise ValueError(f"no local task named {sorted(unknown)}; local tasks: {sorted(LOCAL_TASKS)}")
    os.makedirs(folder, exist_ok=True)
    for name, task in LOCAL_TASKS.items():
        path = data_files.get(name)
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(task_yaml(task, os.path.abspath(path) if path else None))
    return folder


# -- document functions (called by lmms-eval) ------------------------------------------------------
def doc_to_visual(doc: dict[str, Any]) -> list:
    image = doc.get("image")
    return [] if image is None else [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def _references(answer: Any) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    return [str(a) for a in answer]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"vqa_accuracy": vqa_accuracy(results[0], _references(doc["answer"]))}
