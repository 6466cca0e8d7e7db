"""LLaVA conversation records: lazy reading (JSON list or JSONL) and validation with errors that
name the file, the record index and the record id."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence, get_args

from llava_smoe.processing.templates import (
    ConversationError,
    Message,
    check_turn_order,
    normalize_messages,
)

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["error", "skip"]
BAD_SAMPLE_POLICIES = get_args(BadSamplePolicy)
# Why a sample can be rejected (the keys of skip counts).
REASONS = ("malformed", "missing_image", "unreadable_image", "no_assistant_turn", "too_long")


class BadSampleError(ValueError):
    """A record that cannot become a training sample; says which (file, index, id) and why."""

    def __init__(self, reason: str, detail: str, *, source: str, index: int, record_id: Any = None):
        self.reason, self.detail, self.source, self.index, self.record_id = reason, detail, source, index, record_id
        super().__init__(f"{source}: record #{index} (id={record_id!r}): {detail} [{reason}]")


class SkipStats:
    """Counts of skipped samples by reason; merged across workers through collated batches."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def merge(self, counts: dict[str, int] | "SkipStats") -> None:
        self.counts.update(counts.counts if isinstance(counts, SkipStats) else counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def copy(self) -> "SkipStats":
        return SkipStats(self.counts)

    def __repr__(self) -> str:
        return f"SkipStats({self.as_dict()})"


class JsonlRecords(Sequence[dict]):
    """A JSONL file read on demand: only line offsets are kept in memory."""

    def __init__(self, path: str):
        self.path = path
        self._offsets: list[int] = []
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise BadSampleError("malformed", f"invalid JSON line ({e})", source=self.path, index=index) from e

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]


def load_records(path: str) -> Sequence[Any]:
    """A `.json` file holding a list of records, or a `.jsonl` file with one record per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.endswith(".jsonl"):
        return JsonlRecords(path)
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); JSON Lines files must end in .jsonl") from e
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found a {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RecordInfo:
    record_id: Any
    messages: list[Message]
    image_path: str | None  # absolute (joined with the image folder) or None for text-only

    @property
    def has_image(self) -> bool:
        return self.image_path is not None


def check_record(
    record: Any,
    index: int,
    *,
    source: str,
    image_folder: str | None,
    image_token: str = "<image>",
    check_files: bool = True,
) -> RecordInfo:
    """Validate one record's structure (and that its image file exists); raise BadSampleError."""

    def bad(reason: str, detail: str, record_id: Any = None) -> BadSampleError:
        return BadSampleError(reason, detail, source=source, index=index, record_id=record_id)

    if not isinstance(record, dict):
        raise bad("malformed", f"record is a {type(record).__name__}, expected an object")
    record_id = record.get("id")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad("malformed", "missing or empty 'conversations' list", record_id)
    try:
        messages = normalize_messages(turns)
    except ConversationError as e:
        raise bad("malformed", str(e), record_id) from e
    try:
        check_turn_order(messages)
    except ConversationError as e:
        reason = "no_assistant_turn" if "no assistant turn" in str(e) else "malformed"
        raise bad(reason, str(e), record_id) from e

    image = record.get("image")
    placeholders = [i for i, m in enumerate(messages) for _ in range(m.content.count(image_token))]
    if image is None:
        if placeholders:
            raise bad("malformed", f"{image_token!r} appears in turn {placeholders[0]} but the record has no 'image'", record_id)
        return RecordInfo(record_id, messages, None)
    if not isinstance(image, str) or not image:
        raise bad("malformed", f"'image' must be a non-empty relative path string, got {image!r}", record_id)
    first_user = next(i for i, m in enumerate(messages) if m.role == "user")
    if placeholders != [first_user]:
        where = "no turn" if not placeholders else f"turns {placeholders}"
        raise bad(
            "malformed",
            f"a record with an image needs exactly one {image_token!r}, in the first human turn ({first_user}); "
            f"found it in {where}",
            record_id,
        )
    if image_folder is None:
        raise bad("malformed", f"record has image {image!r} but no image folder was given", record_id)
    image_path = os.path.join(image_folder, image)
    if check_files and not os.path.isfile(image_path):
        raise bad("missing_image", f"image file {image_path} does not exist", record_id)
    return RecordInfo(record_id, messages, image_path)
