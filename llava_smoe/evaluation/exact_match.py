"""Exact-match accuracy on LLaVA-JSON question/answer data, without lmms-eval.

`blind=True` replaces every image with a blank one in the encoder's mean colour: the gap
between accuracy and blind accuracy is what the model actually reads from the image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from llava_smoe.evaluation.generation import GenerationOptions, InferenceRunner, Prompt
from llava_smoe.evaluation.questions import QAItem, flatten_records
from llava_smoe.evaluation.vqa import vqa_accuracy
from llava_smoe.processing.images import load_image


@dataclass
class ExactMatchResult:
    accuracy: float
    num_questions: int
    per_type: dict[str, float]  # question type -> accuracy
    per_type_count: dict[str, int]
    # one per question: question_id, question, answer, prediction, correct
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def evaluate_exact_match(
    model: Any,
    processor: Any,
    records: Sequence[dict[str, Any]] | Sequence[QAItem],
    image_folder: str | None,
    blind: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    prompt_suffix: str = "",
) -> ExactMatchResult:
    """Greedy answers to every (question, answer) turn of `records`, scored by normalised match.

    records: LLaVA records (each human/assistant pair is one question; `meta.types` of the
        shapes world gives question types, otherwise the type is "all") or `QAItem`s.
    prompt_suffix: appended to each question (e.g. "\\nAnswer the question using a single word
        or phrase." for models trained on LLaVA-1.5's mix; the shapes world uses none).
    """
    items = list(records) if records and isinstance(records[0], QAItem) else flatten_records(records, image_folder)
    if not items:
        raise ValueError("evaluate_exact_match got no questions")
    runner = InferenceRunner(model, processor)
    blank = runner.blank_image() if blind else None
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    images: dict[str, Image.Image] = {}

    def image_for(item: QAItem) -> list[Image.Image]:
        if item.image_path is None:
            return []
        if blank is not None:
            return [blank]
        if item.image_path not in images:
            images[item.image_path] = load_image(item.image_path)
        return [images[item.image_path]]

    prompts = [Prompt(item.question + prompt_suffix, image_for(item)) for item in items]
    answers = runner.generate(prompts, options, batch_size=batch_size)

    correct_by_type: dict[str, float] = defaultdict(float)
    count_by_type: dict[str, int] = defaultdict(int)
    predictions = []
    for item, prediction in zip(items, answers):
        score = vqa_accuracy(prediction, item.answer)
        correct_by_type[item.question_type] += score
        count_by_type[item.question_type] += 1
        predictions.append({"question_id": item.question_id, "question": item.question, "answer": item.answer,
                            "prediction": prediction, "correct": score == 1.0})
    total = sum(correct_by_type.values())
    return ExactMatchResult(
        accuracy=total / len(items),
        num_questions=len(items),
        per_type={t: correct_by_type[t] / count_by_type[t] for t in sorted(count_by_type)},
        per_type_count={t: count_by_type[t] for t in sorted(count_by_type)},
        predictions=predictions,
    )
