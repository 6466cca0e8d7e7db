import json
import logging

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from llava_smoe.data import (
    BadSampleError,
    DataCollator,
    DataConfig,
    LlavaDataset,
    ModalityLengthGroupedSampler,
    SkippedSample,
)
from llava_smoe.processing import (
    IGNORE_INDEX,
    ImageProcessingConfig,
    LlavaSmoeProcessor,
    ProcessorConfig,
    train_bpe_tokenizer,
)

NUM_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def processor():
    tok = train_bpe_tokenizer(["What color is the circle? red", "a blue square"] * 20, vocab_size=400)
    return LlavaSmoeProcessor(
        tok, ProcessorConfig(template="chatml", num_image_tokens=NUM_IMAGE_TOKENS, image=ImageProcessingConfig(image_size=8))
    )


def good(i, image=True, answer="red"):
    record = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "What color is it?"},
        {"from": "gpt", "value": answer},
    ]}
    if image:
        record["image"] = f"img{i}.png"
    return record


def write_dataset(tmp_path, records, suffix=".json"):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("image"), str) and not r["image"].startswith("missing"):
            Image.new("RGB", (10, 6), (200, 10, 10)).save(folder / r["image"])
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path), str(folder)


def build(tmp_path, records, processor, policy="error", max_length=2048, suffix=".json"):
    path, folder = write_dataset(tmp_path, records, suffix)
    return LlavaDataset(DataConfig(path, folder, max_length=max_length, on_bad_sample=policy), processor)


BAD_AT_INDEXING = {
    "missing_image": dict(good(1), image="missing.png"),
    "malformed_keys": {"id": "r1", "image": "img1.png"},
    "malformed_role": {"id": "r1", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    "placeholder_without_image": {"id": "r1", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    "image_without_placeholder": {"id": "r1", "image": "img1.png", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]},
    "no_assistant_turn": {"id": "r1", "conversations": [{"from": "human", "value": "What?"}]},
}
EXPECTED_REASON = {
    "missing_image": "missing_image",
    "malformed_keys": "malformed",
    "malformed_role": "malformed",
    "placeholder_without_image": "malformed",
    "image_without_placeholder": "malformed",
    "no_assistant_turn": "no_assistant_turn",
}


@pytest.mark.parametrize("case", sorted(BAD_AT_INDEXING))
def test_bad_records_raise_naming_file_index_and_id(tmp_path, processor, case):
    with pytest.raises(BadSampleError) as info:
        build(tmp_path, [good(0), BAD_AT_INDEXING[case], good(2)], processor, policy="error")
    message = str(info.value)
    assert "record #1" in message and "id='r1'" in message and "data.json" in message
    assert info.value.reason == EXPECTED_REASON[case]


@pytest.mark.parametrize("case", sorted(BAD_AT_INDEXING))
def test_bad_records_are_skipped_and_counted(tmp_path, processor, case, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build(tmp_path, [good(0), BAD_AT_INDEXING[case], good(2)], processor, policy="skip")
    assert len(ds) == 2 and [ds.record_index(i) for i in range(2)] == [0, 2]
    assert ds.skip_stats.as_dict() == {EXPECTED_REASON[case]: 1}
    assert "id='r1'" in caplog.text


def unreadable(tmp_path):
    records = [good(0), good(1), good(2)]
    path, folder = write_dataset(tmp_path, records)
    (tmp_path / "images" / "img1.png").write_bytes(b"not a png at all")
    return path, folder


def test_unreadable_image_under_error_policy(tmp_path, processor):
    path, folder = unreadable(tmp_path)
    ds = LlavaDataset(DataConfig(path, folder, on_bad_sample="error"), processor)
    ds[0]
    with pytest.raises(BadSampleError, match=r"record #1 \(id='r1'\): cannot decode image .*img1.png"):
        ds[1]


def test_unreadable_image_skipped_and_counted_through_the_collator(tmp_path, processor):
    path, folder = unreadable(tmp_path)
    ds = LlavaDataset(DataConfig(path, folder, on_bad_sample="skip"), processor)
    assert isinstance(ds[1], SkippedSample) and ds[1].reason == "unreadable_image"
    batch = DataCollator.from_processor(processor)([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[0] == 2 and batch["skipped"] == {"unreadable_image": 1}
    assert ds.validate().as_dict() == {"unreadable_image": 1}


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_too_long_sample(tmp_path, processor, policy):
    long_answer = " ".join(["red blue"] * 40)
    ds = build(tmp_path, [good(0), good(1, answer=long_answer)], processor, policy=policy, max_length=100)
    assert ds[0]["input_ids"].numel() <= 100
    if policy == "error":
        with pytest.raises(BadSampleError, match=r"record #1 \(id='r1'\): sample is \d+ tokens, longer than max_length=100"):
            ds[1]
    else:
        assert ds[1] == SkippedSample("too_long", 1, "r1")


def test_sample_contents(tmp_path, processor):
    ds = build(tmp_path, [good(0), good(1, image=False)], processor)
    s = ds[0]
    assert set(s) == {"input_ids", "labels", "image"} and s["image"].shape == (3, 8, 8)
    assert int((s["input_ids"] == processor.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert processor.decode(s["labels"][s["labels"] != IGNORE_INDEX], skip_special_tokens=False) == "red<|im_end|>"
    assert ds[1]["image"] is None
    assert ds.has_image == [True, False] and ds.lengths[0] > ds.lengths[1]


def test_cache_keeps_built_samples_and_decodes_a_shared_image_once(tmp_path, processor, monkeypatch):
    import llava_smoe.data.dataset as dataset_module

    records = [good(0), dict(good(1), image="img0.png"), good(2, image=False)]  # records 0 and 1 share an image
    path, folder = write_dataset(tmp_path, records)
    plain = LlavaDataset(DataConfig(path, folder), processor)
    cached = LlavaDataset(DataConfig(path, folder, cache=True), processor)
    loads = []
    real_load = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda p: loads.append(p) or real_load(p))
    for _ in range(3):  # three epochs
        for i in range(3):
            a, b = cached[i], plain[i]
            for key in ("input_ids", "labels"):
                assert torch.equal(a[key], b[key])
            assert (a["image"] is None) == (b["image"] is None)
            if b["image"] is not None:
                assert torch.equal(a["image"], b["image"])
    assert len(loads) == 1 + 3 * 2  # the cached dataset decoded img0.png once; the plain one at every use
    assert cached[0]["image"] is cached[1]["image"]


def test_cache_never_keeps_a_bad_sample(tmp_path, processor):
    path, folder = unreadable(tmp_path)
    ds = LlavaDataset(DataConfig(path, folder, on_bad_sample="skip", cache=True), processor)
    collate = DataCollator.from_processor(processor)
    for _ in range(2):  # counted at every use, as without the cache
        assert collate([ds[0], ds[1], ds[2]])["skipped"] == {"unreadable_image": 1}
    (tmp_path / "images" / "img1.png").unlink()
    Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / "images" / "img1.png")  # fixed on disk
    assert not isinstance(ds[1], SkippedSample)


def test_jsonl_matches_json(tmp_path, processor):
    records = [good(0), good(1, image=False), good(2)]
    a = build(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, records, processor)
    b = build(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, records, processor, suffix=".jsonl")
    assert len(a) == len(b) == 3
    for i in range(3):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])


def test_bad_jsonl_line_names_the_line(tmp_path, processor):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good(0, image=False)) + "\n{broken\n")
    with pytest.raises(BadSampleError, match=r"data.jsonl: record #1 .*invalid JSON"):
        LlavaDataset(DataConfig(str(path)), processor)
    ds = LlavaDataset(DataConfig(str(path), on_bad_sample="skip"), processor)
    assert len(ds) == 1 and ds.skip_stats.as_dict() == {"malformed": 1}


def test_data_config_validation():
    with pytest.raises(ValueError, match="on_bad_sample"):
        DataConfig("x.json", on_bad_sample="ignore")
    with pytest.raises(ValueError, match="max_length"):
        DataConfig("x.json", max_length=0)


def test_collation_pads_right_and_mixes_modalities(tmp_path, processor):
    ds = build(tmp_path, [good(0), good(1, image=False, answer="a blue square"), good(2)], processor)
    samples = [ds[0], ds[1], ds[2]]
    batch = DataCollator.from_processor(processor, pad_to_multiple_of=8)(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    B, L = batch["input_ids"].shape
    assert B == 3 and L >= max(lengths) and L % 8 == 0
    for b, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][b, :n], samples[b]["input_ids"])
        assert (batch["input_ids"][b, n:] == processor.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
    # exactly the model's keyword arguments, plus the skip counts the trainer pops
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values", "skipped"}
    assert batch["pixel_values"].shape == (2, 3, 8, 8)  # one row per image, in batch order
    assert torch.equal(batch["pixel_values"][1], samples[2]["image"])
    assert batch["skipped"] == {}


def test_collation_of_text_only_batch_has_no_pixels(tmp_path, processor):
    ds = build(tmp_path, [good(0, image=False)], processor)
    batch = DataCollator.from_processor(processor)([ds[0]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 1


def sampler_inputs(n=103, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 200, (n,), generator=g).tolist()
    has_image = (torch.rand(n, generator=g) < 0.6).tolist()
    return lengths, has_image


def test_sampler_is_deterministic_and_groups_by_modality():
    lengths, has_image = sampler_inputs()
    s = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3, mega_batch_mult=2)
    first, again = list(s), list(ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3, mega_batch_mult=2))
    assert first == again and sorted(first) == list(range(len(lengths)))
    s.set_epoch(1)
    assert list(s) != first
    batches = [first[i : i + 4] for i in range(0, len(first), 4)]
    mixed = [b for b in batches if len({has_image[i] for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] == batches[-1])
    # Length grouping (one mega-batch per modality): far less padding than a random order.
    s = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3)
    batches = [list(s)[i : i + 4] for i in range(0, len(first), 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_spread = sum(max(lengths[i] for i in perm[k : k + 4]) - min(lengths[i] for i in perm[k : k + 4]) for k in range(0, len(perm), 4))
    assert spread < random_spread / 2


def test_sampler_resumes_from_a_position():
    lengths, has_image = sampler_inputs()
    s = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=1)
    s.set_epoch(2)
    full = list(s)
    resumed = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=1)
    resumed.load_state_dict({"epoch": 2, "start": 37, "seed": 1})
    assert list(resumed) == full[37:]
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"epoch": 0, "start": 0, "seed": 9})


def test_sampler_replicas_partition_the_data():
    lengths, has_image = sampler_inputs()
    shards = [list(ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == 35
    assert set().union(*map(set, shards)) == set(range(len(lengths)))
    # Step k on every rank draws from the same modality (one global batch), except the final
    # batches built from the two modalities' leftovers.
    full_batches = sum(has_image) // 12 + (len(has_image) - sum(has_image)) // 12
    for k in range(0, 4 * full_batches, 4):
        assert len({has_image[i] for shard in shards for i in shard[k : k + 4]}) == 1


def test_dataloader_end_to_end(tmp_path, processor):
    records = [good(i, image=i % 3 != 0) for i in range(12)]
    ds = build(tmp_path, records, processor)
    sampler = ModalityLengthGroupedSampler(ds.lengths, ds.has_image, batch_size=4, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=DataCollator.from_processor(processor))
    seen = 0
    for batch in loader:
        with_image = int((batch["input_ids"] == processor.image_token_id).any(-1).sum())
        assert batch["pixel_values"].shape[0] == with_image if with_image else "pixel_values" not in batch
        assert with_image in (0, batch["input_ids"].shape[0])  # one modality per batch
        seen += batch["input_ids"].shape[0]
    assert seen == 12
