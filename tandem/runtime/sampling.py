"""Sampling parameters and the sampler: greedy, temperature, top_p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. Validated at the API boundary."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature); shifted first: a tiny temperature would overflow
    logits / T to inf (NaN probs)."""
    return torch.softmax((logits - logits.max()) / temperature, dim=-1)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top_p: probs sorted descending with everything beyond the nucleus zeroed (not
    renormalised; the most likely token is always kept), and the sort's indices."""
    sorted_p, idx = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
    keep[0] = True
    return torch.where(keep, sorted_p, torch.zeros_like(sorted_p)), idx


@dataclass
class Sampler:
    """Per-sequence sampler; holds its own RNG so a seed reproduces a stream."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor) -> tuple[int, float]:
        """Pick a token from one row of logits; return (token, its probability)."""
        logits = logits.float()
        if self.params.greedy:  # max(-1) is ~4x faster than argmax over a large vocabulary
            top = logits.max(-1)
            return int(top.indices), float(torch.exp(top.values - torch.logsumexp(logits, -1)))
        logits = logits.cpu()  # the seeded CPU generator draws (the same stream on any device)
        probs = tempered(logits, self.params.temperature)
        if self.params.top_p < 1.0:
            sorted_p, idx = nucleus(probs, self.params.top_p)
            choice = int(torch.multinomial(sorted_p, 1, generator=self.generator))
            tok = int(idx[choice])
        else:
            tok = int(torch.multinomial(probs, 1, generator=self.generator))
        return tok, float(probs[tok])
