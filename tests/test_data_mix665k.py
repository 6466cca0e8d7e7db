"""The synthetic dataset shaped like LLaVA-1.5's 665K mix: valid LLaVA records, the mix's sources
and shares, 576 image tokens plus text, text-only records mixed in, lengths cut when asked."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from llava_smoe.data.dataset import DataConfig, LlavaDataset
from llava_smoe.data.mix665k import SHORT_ANSWER, SOURCES, Mix665kConfig, generate_mix665k
from llava_smoe.processing import ImageProcessingConfig, LlavaSmoeProcessor, ProcessorConfig


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    manifest = generate_mix665k(Mix665kConfig(num_records=600, num_images=4, seed=3), str(out))
    return out, manifest


def test_records_follow_the_mix(mix):
    out, manifest = mix
    records = json.loads((out / "train.json").read_text())
    assert len(records) == manifest["records"] == 600
    total = sum(s.records for s in SOURCES)
    for source in SOURCES:  # shares of the 665K mix, within sampling noise
        share = source.records / total
        assert manifest["by_source"].get(source.name, 0) / 600 == pytest.approx(share, abs=4 * (share / 600) ** 0.5)
    assert manifest["text_only"] == manifest["by_source"]["sharegpt"]
    for r in records:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert ("image" in r) == turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == (1 if "image" in r else 0)
        if r["id"].startswith(("vqav2", "gqa")):
            assert all(t["value"].endswith(SHORT_ANSWER) for t in turns[::2])


def test_samples_are_576_image_tokens_plus_text(mix):
    out, _ = mix
    processor = LlavaSmoeProcessor(AutoTokenizer.from_pretrained(out / "tokenizer"), ProcessorConfig(
        template="chatml", num_image_tokens=576, image=ImageProcessingConfig(image_size=336)))
    dataset = LlavaDataset(DataConfig(str(out / "train.json"), str(out / "images"), max_length=100_000), processor)
    sample = dataset[next(i for i, has in enumerate(dataset.has_image) if has)]
    assert sample["image"].shape == (3, 336, 336)
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 576
    lengths = sorted(len(dataset[i]["input_ids"]) for i in range(0, len(dataset), 5))
    text = [n - 576 for n, has in zip(lengths, dataset.has_image[::5]) if has]
    assert min(lengths) > 20 and lengths[len(lengths) // 2] > 576 + 50  # a real text part beside the image
    assert max(lengths) > 1000  # the long tail: detailed descriptions, ShareGPT chats
    assert text


def test_max_words_cuts_whole_turns(tmp_path):
    manifest = generate_mix665k(Mix665kConfig(num_records=200, num_images=2, max_words=60), str(tmp_path))
    records = json.loads((tmp_path / "train.json").read_text())
    assert manifest["words_per_record"]["max"] <= 60
    assert all(len(r["conversations"]) % 2 == 0 and len(r["conversations"]) >= 2 for r in records)
