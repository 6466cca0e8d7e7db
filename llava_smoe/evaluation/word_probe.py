"""Teacher-forced word accuracy: which words of reference answers a checkpoint predicts.

Exact match scores a whole answer to a question; a caption names many things at once ("a red
circle in the top left"). Forcing the reference caption and asking, word by word, whether the
model's most likely next token is the reference's tells whether the model reads an attribute
(colour, shape) from the image at all, apart from whether it has learnt to answer questions
about it. Every score comes with its blind counterpart (each image replaced by a blank one in the
encoder's mean colour): what the words before it give away.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llava_smoe.evaluation.generation import InferenceRunner, sorted_batches
from llava_smoe.evaluation.questions import QAItem

WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass
class GroupScore:
    accuracy: float | None  # words of the group whose every token is the model's argmax (None: no word)
    blind_accuracy: float | None
    count: int  # occurrences of the group's words in the references


@dataclass
class WordProbeResult:
    num_items: int
    token_loss: float  # mean negative log-likelihood per reference token
    blind_token_loss: float
    groups: dict[str, GroupScore]
    words: dict[str, GroupScore]  # every word of a group, by itself

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_words(tokenizer: Any, token_ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The words of a token sequence (lower case, letters and digits) with the indices of the
    tokens that spell each; a token that straddles two words counts for both."""
    ends, text = [], ""
    for j in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: j + 1]), clean_up_tokenization_spaces=False)
        ends.append(len(text))
    words = []
    for match in WORD.finditer(text):
        lo, hi = match.span()
        spelled = [j for j, end in enumerate(ends) if end > lo and (j == 0 or ends[j - 1] < hi)]
        words.append((match.group().lower(), spelled))
    return words


def probe_words(
    model: Any,
    processor: Any,
    items: Sequence[QAItem],
    groups: Mapping[str, Sequence[str]],
    batch_size: int = 16,
) -> WordProbeResult:
    """Teacher-forced accuracy of the reference answers' words, per group of words (e.g.
    {"color": ["red", ...], "shape": ["circle", ...]}), with the image and blind."""
    if not items:
        raise ValueError("probe_words got no items")
    if not groups or any(not words for words in groups.values()):
        raise ValueError(f"give at least one non-empty group of words, got {dict(groups)}")
    group_of: dict[str, list[str]] = {}
    for name, words in groups.items():
        for word in words:
            group_of.setdefault(word.lower(), []).append(name)

    runner = InferenceRunner(model, processor)
    lengths = [len(item.question) + len(item.answer) for item in items]
    tallies = {}
    for blind in (False, True):
        prompts = runner.item_prompts(items, blind=blind)
        hits: dict[str, list[int]] = {}  # group or word -> [hits, count]
        loss, tokens = 0.0, 0
        for batch in sorted_batches(lengths, batch_size):
            scores = runner.continuation_scores([prompts[i] for i in batch], [items[i].answer for i in batch])
            for score in scores:
                loss -= sum(score.logprobs)
                tokens += len(score.token_ids)
                for word, spelled in token_words(processor.tokenizer, score.token_ids):
                    hit = all(score.greedy[j] for j in spelled)
                    for key in group_of.get(word, []) + ([word] if word in group_of else []):
                        tally = hits.setdefault(key, [0, 0])
                        tally[0] += hit
                        tally[1] += 1
        tallies[blind] = (hits, loss / tokens if tokens else math.nan)

    (seen, loss), (seen_blind, loss_blind) = tallies[False], tallies[True]

    def score(key: str) -> GroupScore:
        hit, count = seen.get(key, [0, 0])
        hit_blind, _ = seen_blind.get(key, [0, 0])
        return GroupScore(hit / count if count else None, hit_blind / count if count else None, count)

    if not any(name in seen for name in groups):
        raise ValueError(f"no word of any group {sorted(groups)} occurs in the references")
    return WordProbeResult(
        num_items=len(items), token_loss=loss, blind_token_loss=loss_blind,
        groups={name: score(name) for name in groups},
        words={word: score(word) for word in sorted(group_of) if word in seen},
    )
