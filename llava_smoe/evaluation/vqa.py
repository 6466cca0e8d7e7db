"""VQA answer normalisation and scoring (the VQA v2 evaluation's rules, in plain Python).

`normalize_answer` lower-cases, maps number words to digits, drops articles and punctuation,
and expands common contractions, so "Two.", "2" and "two" all score as the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "its": "it's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're",
}
# A period is punctuation unless it sits inside a number ("2.5" keeps it).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!", "*", "#", "%", "^", "&", "$", ":"]


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # Dropped next to a space ("yes, no" -> "yes no"); elsewhere it splits words ("t-shirt" -> "t shirt").
        if (p + " " in text or " " + p in text) or re.search(_COMMA_IN_NUMBER, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """Canonical form of a free-form answer: lowercase, no punctuation/articles, digits."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _strip_punctuation(text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def first_line(prediction: str) -> str:
    """The answer a model gave before any follow-up text (models sometimes keep talking)."""
    stripped = prediction.strip()
    return stripped.splitlines()[0] if stripped else ""


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """Score in [0, 1] of a prediction against one or several reference answers.

    One reference: exact match after normalisation. Several (VQA v2 has ten human answers):
    min(1, matches / 3), the VQA consensus rule; with fewer than three references a single
    match is enough for full credit.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(first_line(prediction))
    matches = sum(pred == normalize_answer(r) for r in refs)
    return min(1.0, matches / 3) if len(refs) >= 3 else float(matches > 0)
