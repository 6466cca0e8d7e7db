"""LM corpora: reading with a bad-input policy, the token cache, packed sequences."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from lm_helpers import write_corpus

from llava_smoe.data.text import (
    PackedSequences,
    ReadOptions,
    build_token_cache,
    collate,
    held_out_windows,
    iter_documents,
    resolve_files,
    spread_windows,
    token_dtype,
)


def test_corrupt_and_empty_documents_are_counted_and_skipped(tmp_path, caplog):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps({"text": "first document"}).encode(),
        b"{not json",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps(["a", "list"]).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff bytes"}',
        b"",
        json.dumps({"text": "second document"}).encode(),
    ]))
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"para one\nstill one\n\n \n\npara \xfe two\n\npara three\n")
    skipped = Counter()
    docs = list(iter_documents([jsonl, txt], ReadOptions(text_split="paragraph"), skipped))
    assert docs == ["first document", "second document", "para one\nstill one", "para three"]
    assert skipped == {"bad_json": 1, "missing_text": 3, "empty": 1, "undecodable": 2}
    lines = list(iter_documents([txt], ReadOptions(text_split="line"), Counter()))
    assert lines == ["para one", "still one", "para three"]
    assert list(iter_documents([txt], ReadOptions(format="text", text_split="file"), skipped := Counter())) == []
    assert skipped == {"undecodable": 1}
    with caplog.at_level("INFO", logger="llava_smoe.data.text"):
        cache = build_token_cache([jsonl], ReadOptions(), tmp_path / "cache", bpe_vocab_size=300)
    assert cache.meta["documents"] == 2
    assert cache.meta["skipped"] == {"bad_json": 1, "missing_text": 3, "empty": 1, "undecodable": 1}
    assert "skipped 6 documents (bad_json: 1, empty: 1, missing_text: 3, undecodable: 1)" in caplog.text


def test_resolve_files_takes_dirs_and_globs_and_names_missing_input(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/sub/a.jsonl", "d/skip.csv"):
        (tmp_path / name).write_text("x\n")
    assert resolve_files([str(tmp_path / "d")], "lm.data") == [tmp_path / "d/b.txt", tmp_path / "d/sub/a.jsonl"]
    assert resolve_files([str(tmp_path / "d/*.txt")], "lm.data") == [tmp_path / "d/b.txt"]
    with pytest.raises(FileNotFoundError, match="lm.data: .*nope.*matches no file"):
        resolve_files([str(tmp_path / "nope.txt")], "lm.data")
    with pytest.raises(ValueError, match="set lm.format"):
        list(iter_documents([tmp_path / "d/skip.csv"], ReadOptions(), Counter()))


def test_token_cache_is_reused_and_keyed_by_content(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", lines=200)
    opts = ReadOptions(text_split="line")
    first = build_token_cache([corpus], opts, tmp_path / "cache", bpe_vocab_size=300)
    assert not first.reused and first.meta["documents"] == 200 and first.meta["dtype"] == "uint16"
    second = build_token_cache([corpus], opts, tmp_path / "cache", bpe_vocab_size=300)
    assert second.reused and second.path == first.path
    np.testing.assert_array_equal(first.tokens, second.tokens)
    # Documents are joined with EOS after each one and decode back to the text.
    tok = first.load_tokenizer()
    tokens = np.asarray(first.tokens)
    assert (tokens == tok.eos_token_id).sum() == 200 and tokens[-1] == tok.eos_token_id
    first_doc = tokens[: int(np.argmax(tokens == tok.eos_token_id))]
    assert tok.decode(first_doc.tolist()) == corpus.read_text().splitlines()[0]
    # A changed file, other read options or another tokenizer make a new cache.
    assert build_token_cache([corpus], ReadOptions(text_split="file"), tmp_path / "cache",
                             bpe_vocab_size=300).path != first.path
    given = build_token_cache([corpus], opts, tmp_path / "cache", tokenizer=tok)
    assert given.path != first.path and not given.reused
    np.testing.assert_array_equal(given.tokens, first.tokens)  # same tokenizer, same stream
    corpus.write_text(corpus.read_text() + "one more line\n")
    changed = build_token_cache([corpus], opts, tmp_path / "cache", bpe_vocab_size=300)
    assert changed.path != first.path and changed.meta["documents"] == 201
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_empty_corpus_fails_with_the_skip_counts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{oops\n')
    with pytest.raises(ValueError, match=r"no usable document .*'empty': 1"):
        build_token_cache([bad], ReadOptions(), tmp_path / "cache", bpe_vocab_size=300)


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta"]}), path)
    skipped = Counter()
    assert list(iter_documents([path], ReadOptions(), skipped)) == ["alpha", "beta"]
    assert skipped == {"missing_text": 1, "empty": 1}
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents([path], ReadOptions(text_field="body"), Counter()))


def test_packed_sequences_and_held_out_windows():
    tokens = np.arange(50, dtype=np.uint16)
    ds = PackedSequences(tokens, 8)
    assert len(ds) == 6 and ds[1].tolist() == list(range(8, 16)) and ds[1].dtype == torch.int64
    train, held = held_out_windows(6, 2)
    assert held.tolist() == [0, 5] and train.tolist() == [1, 2, 3, 4]
    assert spread_windows(100, 4).tolist() == [0, 33, 66, 99]
    assert PackedSequences(tokens, 8, held)[1].tolist() == list(range(40, 48))
    batch = collate([ds[0], ds[2]])
    assert batch["input_ids"].shape == (2, 8) and torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(ValueError, match="no sequence of length 64"):
        PackedSequences(tokens, 64)
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
