"""Token ids in, text deltas out: the incremental decoding every streamed reply goes through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStreamer:
    """Holds back incomplete characters and partial stop strings, so the concatenated deltas
    equal the final text exactly and never split a character."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self._emitted = 0
        # Decode ids[_prefix:] and diff against ids[_prefix:_read]: the preceding tokens give
        # context (leading-space rules of some tokenizers) without re-decoding everything.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (delta, stopped). After `stopped` the text ends before the stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """End of generation: release everything still held back."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self.text += after[len(before):]
        self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        cut = min((i for i in (self.text.find(s, self._emitted) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text = self.text[:cut]
            delta, self._emitted = self.text[self._emitted:], cut
            return delta, True
        end = len(self.text)
        if not final:
            # A suffix that may grow into a stop string is not released yet.
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self._emitted, end - hold)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta, False
