"""Question/answer items from LLaVA JSON, and their export to parquet for lmms-eval.

Each human/assistant pair of a record becomes one standalone question about the record's
image (the synthetic shapes world asks independent questions, so no turn depends on an
earlier one). The shapes world's `meta.types` gives each turn's question type.

The parquet layout (what the local lmms-eval tasks in `eval/` read):
    question_id: str, question: str, answer: str, question_type: str,
    image: `datasets.Image()` (PNG/JPEG bytes; null for text-only questions),
    image_position: str ("first" or "last": where the record put the image; the `llava_smoe`
    lmms-eval model prompts the same way)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llava_smoe.data.records import check_record, load_records
from llava_smoe.processing.templates import placement_of

QUESTION_COLUMNS = ("question_id", "question", "answer", "question_type", "image", "image_position")
DEFAULT_QUESTION_TYPE = "all"


@dataclass(frozen=True)
class QAItem:
    question_id: str
    question: str
    answer: str
    image_path: str | None  # joined with the image folder; None for text-only
    question_type: str = DEFAULT_QUESTION_TYPE
    # Where the record put the image: before the question or after it. Evaluation prompts the
    # same way, whatever the checkpoint's processor would do with an unplaced image.
    image_position: str = "first"

    def prompt_text(self, image_token: str = "<image>", suffix: str = "") -> str:
        """The question (plus `suffix`) with the image placeholder where the record had it."""
        from llava_smoe.processing.templates import with_placeholders

        count = 0 if self.image_path is None else 1
        return with_placeholders(self.question + suffix, image_token, count, self.image_position)


def default_image_folder(data_path: str) -> str:
    """`images/` next to the data file when it exists (the shapes world's layout), else its folder."""
    folder = os.path.dirname(os.path.abspath(data_path))
    images = os.path.join(folder, "images")
    return images if os.path.isdir(images) else folder


def flatten_records(
    records: Iterable[dict[str, Any]], image_folder: str | None, *, source: str = "<records>",
    image_token: str = "<image>",
) -> list[QAItem]:
    """One QAItem per (human, assistant) pair; records are validated like training data."""
    items: list[QAItem] = []
    for index, record in enumerate(records):
        info = check_record(record, index, source=source, image_folder=image_folder, image_token=image_token)
        types = (record.get("meta") or {}).get("types") or []
        turns = [m for m in info.messages if m.role != "system"]
        pairs = [(q, a) for q, a in zip(turns[::2], turns[1::2]) if q.role == "user" and a.role == "assistant"]
        base_id = str(record.get("id", index))
        for k, (q, a) in enumerate(pairs):
            content = q.content.strip()
            # An image inside the text is prompted before it: QAItem keeps first or last.
            position = "last" if placement_of(content, image_token) == "last" else "first"
            question = content.replace(image_token, "").strip()
            qtype = str(types[k]) if k < len(types) else DEFAULT_QUESTION_TYPE
            qid = base_id if len(pairs) == 1 else f"{base_id}#{k}"
            items.append(QAItem(qid, question, a.content.strip(), info.image_path, qtype, position))
    return items


def load_questions(path: str, image_folder: str | None = None) -> list[QAItem]:
    """QAItems from a LLaVA `.json` / `.jsonl` file (image folder: see `default_image_folder`)."""
    folder = image_folder if image_folder is not None else default_image_folder(path)
    return flatten_records(load_records(path), folder, source=path)


def export_parquet(items: Sequence[QAItem], out_path: str) -> str:
    """Write items as a parquet file with a `datasets.Image()` column; returns `out_path`.

    Image files are embedded as their encoded bytes (no re-encoding), so the file is
    self-contained and lmms-eval reads it offline with `dataset_path: parquet`.
    """
    import datasets

    if not items:
        raise ValueError(f"no questions to export to {out_path}")
    features = datasets.Features({
        "question_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "image": datasets.Image(),
        "image_position": datasets.Value("string"),
    })
    columns: dict[str, list] = {name: [] for name in QUESTION_COLUMNS}
    for item in items:
        columns["question_id"].append(item.question_id)
        columns["question"].append(item.question)
        columns["answer"].append(item.answer)
        columns["question_type"].append(item.question_type)
        columns["image_position"].append(item.image_position)
        if item.image_path is None:
            columns["image"].append(None)
        else:
            with open(item.image_path, "rb") as f:
                columns["image"].append({"bytes": f.read(), "path": os.path.basename(item.image_path)})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(out_path)
    return out_path


def check_parquet_columns(path: str) -> None:
    """Raise naming the missing columns when a parquet file cannot feed the local VQA task."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"parquet file {path} does not exist")
    names = set(pq.read_schema(path).names)
    missing = [c for c in ("question", "answer") if c not in names]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing}; the local VQA task needs 'question' and 'answer' "
            f"(optional: 'image' as datasets.Image(), 'question_type', 'question_id', "
            f"'image_position'); found {sorted(names)}"
        )
