"""Sampling options (the one class every front end fills in) and the sampling of next tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava_smoe.config import Config, ConfigError, invalid


class RequestError(ValueError):
    """A request the engine refuses (bad conversation, bad sampling options, too long).
    `param`: the option or field at fault, when one is."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class SamplingError(RequestError):
    code = "invalid_value"


@dataclass
class SamplingParams(Config):
    """How one reply is generated.

    max_new_tokens: None uses the engine's default, capped by the room left in the context.
    temperature: 0 is greedy; otherwise softmax(logits / temperature), restricted by top_p
        (nucleus: the smallest set of tokens whose probability reaches top_p).
    stop: strings that end the reply (not included in it).
    seed: makes a sampled reply reproducible (a generator per request).
    ignore_eos: keep generating through end-of-turn / EOS tokens until max_new_tokens or a stop
        string (fixed reply lengths, as benchmarks want; vLLM has the same option).
    """

    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        try:
            super().__post_init__()
        except ConfigError as e:  # a refused request, naming the option
            raise SamplingError(str(e), param=".".join(e.path) or None) from None

    def validate(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise invalid("max_new_tokens", f"must be a positive int, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise invalid("temperature", f"must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise invalid("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not all(self.stop):
            raise invalid("stop", f"stop strings must be non-empty, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_tokens(logits_BV: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One next token per row: argmax for greedy rows, temperature + top-p sampling for the rest."""
    next_B = logits_BV.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs_V = torch.softmax(logits_BV[i] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_V, order_V = probs_V.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop_V = sorted_V.cumsum(0) - sorted_V >= p.top_p
            sorted_V[drop_V] = 0.0
            probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
        next_B[i] = torch.multinomial(probs_V, 1, generator=generators[i])[0]
    return next_B
