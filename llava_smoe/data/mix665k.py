"""A synthetic LLaVA-format dataset with the shape of LLaVA-1.5's 665K instruction mix.

For dry runs and memory checks at real shapes: the words are drawn from a fixed list and the
images are noise, but every record has the structure of its source (one image placeholder in
the first human turn, or none; single- or multi-turn; short answers with the short-answer
suffix, multiple choice, long descriptions) and a length drawn from that source's range, so a
tokenised sample is 576 image tokens (CLIP-L/336) plus a text part spread as in the mix.

Where the shape comes from:
- the sources and their record counts are those of the mix (LLaVA-1.5, "Improved Baselines
  with Visual Instruction Tuning", Liu et al. 2023, Table 7; LLaVA-Instruct's 158K split into
  conversation 58K, detail 23K, complex reasoning 77K as in the LLaVA paper), ShareGPT's 40K
  being text-only (6% of records);
- the formats are the mix's: VQA-style sources merge several questions about one image into one
  multi-turn record and append "Answer the question using a single word or phrase.";
  A-OKVQA is multiple choice with "Answer with the option's letter from the given choices
  directly."; RefCOCO and Visual Genome ask about regions given as boxes;
- the turn counts and words per message of each source (`SOURCES`) are estimates from those
  formats, not measurements of the released file: conversations of a few sentences per turn,
  detailed descriptions of ~80-200 words, ShareGPT's long multi-turn chats (truncated by the
  recipe's max_length as in training), one to a few words per VQA answer.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from llava_smoe.config import Config, invalid

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Source:
    """One source of the mix: records in 665K, and ranges (inclusive) of turns and words."""

    name: str
    records: int
    image: bool
    turns: tuple[int, int]
    question_words: tuple[int, int]
    answer_words: tuple[int, int]
    style: str = "open"  # "open", "short" (short-answer suffix), "choice" (lettered options), "region" (boxes)


SOURCES = (
    Source("llava_conversation", 58_000, True, (2, 5), (6, 18), (20, 90)),
    Source("llava_detail", 23_000, True, (1, 1), (6, 14), (80, 200)),
    Source("llava_complex_reasoning", 77_000, True, (1, 1), (10, 28), (60, 180)),
    Source("sharegpt", 40_000, False, (1, 6), (10, 120), (80, 320)),
    Source("vqav2", 83_000, True, (1, 8), (4, 10), (1, 2), "short"),
    Source("gqa", 72_000, True, (1, 8), (5, 14), (1, 2), "short"),
    Source("okvqa", 9_000, True, (1, 3), (5, 12), (1, 3), "short"),
    Source("ocrvqa", 80_000, True, (3, 8), (4, 8), (1, 5), "short"),
    Source("aokvqa", 66_000, True, (1, 2), (8, 20), (1, 1), "choice"),
    Source("textcaps", 22_000, True, (1, 1), (5, 10), (8, 20)),
    Source("refcoco", 48_000, True, (2, 8), (4, 10), (3, 10), "region"),
    Source("vg", 86_000, True, (2, 10), (6, 14), (3, 12), "region"),
)

WORDS = (
    "the a of and to in is that it on for with as was at by this be from or an are which one all there "
    "image picture photo person man woman child dog cat car bus street table window tree sky building "
    "red blue green white black yellow left right top bottom front behind near large small two three "
    "sitting standing holding wearing looking walking playing open closed wooden metal glass water food "
    "plate cup book sign shirt hat bag chair bench road field grass wall door light shadow background "
    "because while some many several appears seems likely probably scene shows there are visible "
    "question answer reason think could would should might describe explain detail context also"
).split()


@dataclass
class Mix665kConfig(Config):
    """num_records: records to write, drawn from the sources in their 665K proportions.
    num_images: noise images they share (the processor resizes them to the tower's size).
    max_words: cut each record to whole turns within this many words (its first turn shortened
        if it alone is longer), as truncation to a max_length would; None keeps all."""

    num_records: int = 1000
    num_images: int = 16
    image_size: int = 64
    seed: int = 0
    vocab_size: int = 2048
    max_words: int | None = None

    def validate(self) -> None:
        for name in ("num_records", "num_images", "image_size"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_words is not None and self.max_words < 16:
            raise invalid("max_words", f"must be >= 16 (a question and an answer), got {self.max_words}")


def _words(rng: random.Random, span: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*span)))


def _question(rng: random.Random, source: Source) -> str:
    q = _words(rng, source.question_words).capitalize() + "?"
    if source.style == "short":
        return f"{q}\n{SHORT_ANSWER}"
    if source.style == "choice":
        options = "\n".join(f"{letter}. {_words(rng, (1, 4))}" for letter in "ABCD")
        return f"{q}\n{options}\n{MULTIPLE_CHOICE}"
    if source.style == "region":
        box = ", ".join(f"{rng.random():.2f}" for _ in range(4))
        return f"{q} [{box}]"
    return q


def _answer(rng: random.Random, source: Source) -> str:
    if source.style == "choice":
        return rng.choice("ABCD")
    return _words(rng, source.answer_words).capitalize() + "."


def make_record(rng: random.Random, source: Source, index: int, image: str | None, max_words: int | None = None) -> dict:
    turns, words = [], 0
    for t in range(rng.randint(*source.turns)):
        question = _question(rng, source)
        if t == 0 and image is not None:
            question = f"<image>\n{question}"
        answer = _answer(rng, source)
        if max_words is not None:
            room = max_words - words - len(question.split())
            if turns and room < len(answer.split()):
                break  # whole turns only
            if room < 1:  # a first question longer than the budget (a long chat's): cut it
                prefix = "<image>\n" if question.startswith("<image>\n") else ""
                kept = question[len(prefix):].split()[: max_words - 1 - bool(prefix)]
                question = prefix + " ".join(kept)  # split() as the count does: newlines inside are spaces
                room = 1
            answer = " ".join(answer.split()[:room])
        words += len(question.split()) + len(answer.split())
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": f"{source.name}-{index}", "conversations": turns}
    if image is not None:
        record["image"] = image
    return record


def generate_mix665k(config: Mix665kConfig, out_dir: str) -> dict:
    """Write `train.json`, `images/` and `tokenizer/` (a BPE trained on the text) under `out_dir`;
    returns the manifest (also written as `manifest.json`)."""
    import numpy as np
    from PIL import Image

    from llava_smoe.processing.tokenizer import train_bpe_tokenizer

    rng = random.Random(config.seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images = []
    for i in range(config.num_images):
        pixels = np.random.default_rng(config.seed + i).integers(0, 256, (config.image_size, config.image_size, 3))
        name = f"noise_{i:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(out_dir, "images", name))
        images.append(name)
    weights = [s.records for s in SOURCES]
    records, counts = [], Counter()
    for i in range(config.num_records):
        source = rng.choices(SOURCES, weights=weights)[0]
        counts[source.name] += 1
        records.append(make_record(rng, source, i, rng.choice(images) if source.image else None, config.max_words))
    with open(os.path.join(out_dir, "train.json"), "w") as f:
        json.dump(records, f)
    text = (turn["value"] for r in records for turn in r["conversations"])
    tokenizer = train_bpe_tokenizer(text, vocab_size=config.vocab_size)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    manifest = {
        "config": config.to_dict(), "data": "train.json", "image_folder": "images", "tokenizer": "tokenizer",
        "records": len(records), "by_source": dict(sorted(counts.items())),
        "text_only": sum(1 for r in records if "image" not in r),
        "words_per_record": {"mean": sum(words) / len(words), "min": min(words), "max": max(words)},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
