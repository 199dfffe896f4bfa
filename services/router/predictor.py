"""Per-request latency and energy of an expert: the cost model, corrected by telemetry.

- `modelled_s`: the cost model's latency (compute on the device + transmission, no
  correction) for a request shape.
- `predicted_s`: `modelled_s x LatencyTelemetry.correction(expert)`: what the router expects
  to measure; delay budgets are checked against it.
- `energy_j`: MODELLED energy (device power x modelled compute time + transmit power x
  transmit time). It is never corrected by measured latency: nothing measures power here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.router.cost import Category, expert_cost
from services.router.profiles import ExpertSpec
from services.router.telemetry import LatencyTelemetry

CHARS_PER_TOKEN = 4.0  # prompt-length estimate before any tokenizer has seen the prompt


@dataclass(frozen=True)
class Shape:
    """A request's size: prompt tokens and output tokens."""

    prompt_tokens: int
    output_tokens: int

    @classmethod
    def estimate(cls, prompt_units: int, max_tokens: int) -> Shape:
        """From the front end's placeholder prompt length (UTF-8 bytes, an upper bound on
        tokens) and max_tokens: ~4 bytes per token."""
        return cls(math.ceil(prompt_units / CHARS_PER_TOKEN), max_tokens)

    def rounded_up(self) -> Shape:
        """The shape class (each count rounded up to a power of two, at least 1): requests of
        one class share a cached coarse selection, and the class never under-prices them."""
        return Shape(_pow2(self.prompt_tokens), _pow2(self.output_tokens))

    def category(self) -> Category:
        name = f"p{self.prompt_tokens}.o{self.output_tokens}"
        return Category(name, self.prompt_tokens, self.output_tokens)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class Predictor:
    """Latency and energy of the configured experts (`specs`: expert id -> ExpertSpec)."""

    def __init__(self, specs: Mapping[str, ExpertSpec], telemetry: LatencyTelemetry) -> None:
        self.specs = dict(specs)
        self.telemetry = telemetry

    def modelled_s(self, expert_id: str, shape: Shape) -> float:
        return expert_cost(self.specs[expert_id], shape.category()).delay_s

    def predicted_s(self, expert_id: str, shape: Shape) -> float:
        return self.modelled_s(expert_id, shape) * self.telemetry.correction(expert_id)

    def energy_j(self, expert_id: str, shape: Shape) -> float:
        return expert_cost(self.specs[expert_id], shape.category()).energy_j

    def observe(self, expert_id: str, actual: Shape, measured_s: float) -> None:
        """Feed one finished call (its actual token counts and wall time) to the telemetry."""
        if expert_id in self.specs:
            self.telemetry.observe(expert_id, self.modelled_s(expert_id, actual), measured_s)
