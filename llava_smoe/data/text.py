"""Text corpora tokenised once into a memory-mapped token file, read as packed sequences.

Inputs: plain text (`.txt`, `.md`; documents are lines, blank-line separated paragraphs or
whole files), JSON lines (`.jsonl`, one object per line with a text field) and parquet (a text
column; needs pyarrow). Documents are tokenised without special tokens and joined with EOS
after each one into `tokens.bin` (uint16 when the vocabulary fits, else uint32).

The cache folder is named by a hash of the input files' bytes, the reading options and the
tokenizer, so a second run over the same data reuses it. Corrupt or empty documents (a line
that is not JSON, a record without the text field or with a non-string one, empty text,
bytes that are not UTF-8) are skipped and counted; the counts are logged and kept in the
cache's `meta.json`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
FORMATS = ("auto", "text", "jsonl", "parquet")
CACHE_VERSION = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
_PARAGRAPH = re.compile(rb"\n[ \t\r]*\n")
_ENCODE_BATCH = 512

Format = Literal["auto", "text", "jsonl", "parquet"]
TextSplit = Literal["line", "paragraph", "file"]


@dataclass(frozen=True)
class ReadOptions:
    format: Format = "auto"
    text_field: str = "text"
    text_split: TextSplit = "paragraph"

    def key(self) -> dict[str, str]:
        return {"format": self.format, "text_field": self.text_field, "text_split": self.text_split}


def resolve_files(specs: list[str], where: str) -> list[Path]:
    """Files named by paths, directories (searched recursively) or glob patterns, in a stable order."""
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files: list[Path] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in known)
            if not found:
                raise FileNotFoundError(f"{where}: directory {spec} holds no {'/'.join(known)} files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"{where}: {spec} matches no file (give files, directories or glob patterns)")
        files += [f for f in found if f not in files]
    if not files:
        raise FileNotFoundError(f"{where}: no input files given")
    return files


def file_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    for name, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if path.suffix in suffixes:
            return name
    raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; set lm.format "
                     f"to one of {FORMATS[1:]}")


def iter_documents(files: list[Path], options: ReadOptions, skipped: Counter) -> Iterator[str]:
    """Every usable document of `files` in order; `skipped[reason]` counts the others."""
    for path in files:
        fmt = file_format(path, options.format)
        if fmt == "text":
            yield from _text_documents(path, options.text_split, skipped)
        elif fmt == "jsonl":
            yield from _jsonl_documents(path, options.text_field, skipped)
        else:
            yield from _parquet_documents(path, options.text_field, skipped)


def _usable(text: str, skipped: Counter) -> bool:
    if not text.strip():
        skipped["empty"] += 1
        return False
    return True


def _text_documents(path: Path, split: TextSplit, skipped: Counter) -> Iterator[str]:
    data = path.read_bytes()
    if split == "file":
        chunks = [data]
    elif split == "paragraph":
        chunks = _PARAGRAPH.split(data)
    else:
        chunks = data.split(b"\n")
    for chunk in chunks:
        if split != "file" and not chunk.strip():
            continue  # blank lines separate documents; they are not documents
        try:
            text = chunk.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        if _usable(text, skipped):
            yield text


def _jsonl_documents(path: Path, field: str, skipped: Counter) -> Iterator[str]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skipped["missing_text"] += 1
                continue
            if _usable(text, skipped):
                yield text


def _parquet_documents(path: Path, field: str, skipped: Counter) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or the 'eval' extra)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set lm.text_field")
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["undecodable"] += 1
                    continue
            if not isinstance(value, str):
                skipped["missing_text"] += 1
                continue
            if _usable(value, skipped):
                yield value


# -- fingerprints --------------------------------------------------------------------------------
def files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; the LM data needs one (tokenizer.json)")
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([tokenizer.eos_token, len(tokenizer)]).encode())
    return h.hexdigest()


def cache_key(files: list[Path], options: ReadOptions, tokenizer_id: str) -> str:
    payload = {"version": CACHE_VERSION, "files": files_fingerprint(files), "read": options.key(),
               "tokenizer": tokenizer_id}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# -- the token cache -----------------------------------------------------------------------------
@dataclass
class TokenCache:
    """One tokenised corpus: `tokens` is a read-only memmap of the packed token stream."""

    path: Path
    meta: dict[str, Any]
    reused: bool

    @property
    def tokens(self) -> np.memmap:
        return np.memmap(self.path / TOKENS_FILE, dtype=self.meta["dtype"], mode="r",
                         shape=(self.meta["num_tokens"],))

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / TOKENIZER_DIR)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def build_token_cache(files: list[Path], options: ReadOptions, cache_root: Path, *, tokenizer: Any = None,
                      bpe_vocab_size: int = 512) -> TokenCache:
    """Tokenise `files` into `cache_root/<key>/` unless that folder exists already.

    tokenizer: a transformers fast tokenizer, or None to train a byte-level BPE of
    `bpe_vocab_size` on these documents (stored with the tokens, reused by later runs).
    """
    tokenizer_id = f"bpe:{bpe_vocab_size}" if tokenizer is None else tokenizer_fingerprint(tokenizer)
    key = cache_key(files, options, tokenizer_id)
    final = cache_root / key
    if (final / META_FILE).is_file():
        cache = TokenCache(final, json.loads((final / META_FILE).read_text()), reused=True)
        log_corpus(cache)
        return cache

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_root))
    try:
        if tokenizer is None:
            from llava_smoe.processing import train_bpe_tokenizer

            tokenizer = train_bpe_tokenizer(iter_documents(files, options, Counter()), vocab_size=bpe_vocab_size)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; documents are separated by EOS, so it needs one")
        dtype = token_dtype(len(tokenizer))
        skipped: Counter = Counter()
        documents = num_tokens = 0
        with open(tmp / TOKENS_FILE, "wb") as out:
            for batch in _batches(iter_documents(files, options, skipped), _ENCODE_BATCH):
                ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
                flat = np.concatenate([np.asarray([*doc, tokenizer.eos_token_id], dtype=np.int64) for doc in ids])
                flat.astype(dtype).tofile(out)
                documents += len(batch)
                num_tokens += flat.size
        if documents == 0:
            raise ValueError(f"no usable document in {[str(f) for f in files]} (skipped: {dict(skipped)})")
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        meta = {
            "version": CACHE_VERSION, "key": key, "files": [str(f) for f in files], "read": options.key(),
            "tokenizer": tokenizer_id, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "dtype": dtype, "num_tokens": num_tokens, "documents": documents, "skipped": dict(skipped),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # last: marks the folder complete
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = TokenCache(final, json.loads((final / META_FILE).read_text()), reused=False)
    log_corpus(cache)
    return cache


def log_corpus(cache: TokenCache) -> None:
    m = cache.meta
    log.info("%s %s documents, %s tokens (%s) at %s", "reused" if cache.reused else "tokenised",
             f"{m['documents']:,}", f"{m['num_tokens']:,}", m["dtype"], cache.path)
    if m["skipped"]:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(m["skipped"].items()))
        log.warning("skipped %d documents (%s)", sum(m["skipped"].values()), detail)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class PackedSequences(Dataset):
    """Fixed-length windows of a token stream: item i is `tokens[w*L : (w+1)*L]`, w = windows[i].

    Documents run across window boundaries (EOS marks where one ends), as in GPT-style
    pretraining; no token is padding, so every position is a training target.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, windows: np.ndarray | None = None):
        available = len(tokens) // seq_len
        if available < 1:
            raise ValueError(f"{len(tokens)} tokens make no sequence of length {seq_len}")
        self.windows = np.arange(available) if windows is None else np.asarray(windows, dtype=np.int64)
        if self.windows.size and not 0 <= self.windows.min() <= self.windows.max() < available:
            raise ValueError(f"window indices must lie in [0, {available}) for {len(tokens)} tokens of {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        lo = int(self.windows[i]) * self.seq_len
        return torch.from_numpy(self.tokens[lo : lo + self.seq_len].astype(np.int64))


def spread_windows(total: int, count: int) -> np.ndarray:
    """`count` window indices spread evenly over `total`, so a corpus whose files are not
    shuffled (one topic after another) is sampled throughout."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot pick {count} of {total} sequences")
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64)) if count else np.zeros(0, np.int64)


def held_out_windows(total: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) window indices with `count` evenly spread eval windows."""
    held = spread_windows(total, count)
    mask = np.ones(total, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(items)
    return {"input_ids": input_ids, "labels": input_ids}  # the model shifts labels itself
