"""Per-request latency and energy of an expert: the cost model, corrected by telemetry.

- `modelled_s`: the cost model's latency (compute on the device + transmission, no
  correction) for a request shape.
- `predicted_s`: `modelled_s x LatencyTelemetry.correction(expert)`: what the router expects
  to measure; delay budgets are checked against it.
- `energy_j`: modelled energy (device power x modelled compute time + transmit power x
  transmit time) x the expert's measured/modelled energy ratio (`energy_telemetry`, 1.0 until
  the expert reports measured joules). Never corrected by measured latency.
- `energy_of`: one finished call's energy and its source: the joules the expert measured
  (its usage's `energy_joules` with `energy_source` "measured:..."), which also feed the
  energy telemetry, else the prediction, labelled "modelled".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def __init__(
        self,
        specs: Mapping[str, ExpertSpec],
        telemetry: LatencyTelemetry,
        energy_telemetry: LatencyTelemetry | None = None,
    ) -> None:
        self.specs = dict(specs)
        self.telemetry = telemetry
        self.energy_telemetry = energy_telemetry or LatencyTelemetry()

    def modelled_s(self, expert_id: str, shape: Shape) -> float:
        return expert_cost(self.specs[expert_id], shape.category()).delay_s

    def predicted_s(self, expert_id: str, shape: Shape) -> float:
        return self.modelled_s(expert_id, shape) * self.telemetry.correction(expert_id)

    def modelled_energy_j(self, expert_id: str, shape: Shape) -> float:
        return expert_cost(self.specs[expert_id], shape.category()).energy_j

    def energy_j(self, expert_id: str, shape: Shape) -> float:
        correction = self.energy_telemetry.correction(expert_id)
        return self.modelled_energy_j(expert_id, shape) * correction

    def energy_of(
        self, expert_id: str, actual: Shape, report: Mapping[str, Any] | None
    ) -> tuple[float, str]:
        """(joules, source) of one finished call (module docstring)."""
        joules = measured_joules(report)
        if joules is None or expert_id not in self.specs:
            return self.energy_j(expert_id, actual), "modelled"
        before = self.energy_telemetry.version
        modelled = self.modelled_energy_j(expert_id, actual)
        self.energy_telemetry.observe(expert_id, modelled, joules)
        if self.energy_telemetry.version != before:  # cached selections priced it otherwise
            self.telemetry.invalidate()
        return joules, str(report["energy_source"])  # type: ignore[index]

    def observe(self, expert_id: str, actual: Shape, measured_s: float) -> None:
        """Feed one finished call (its actual token counts and wall time) to the telemetry."""
        if expert_id in self.specs:
            self.telemetry.observe(expert_id, self.modelled_s(expert_id, actual), measured_s)


def measured_joules(report: Mapping[str, Any] | None) -> float | None:
    """An expert's measured joules from its usage report, or None (absent or modelled)."""
    if not report:
        return None
    source, joules = report.get("energy_source"), report.get("energy_joules")
    if not (isinstance(source, str) and source.startswith("measured")):
        return None
    if isinstance(joules, bool) or not isinstance(joules, int | float):
        return None
    return float(joules) if math.isfinite(joules) and joules >= 0 else None
