"""Latency telemetry: how far each expert's measured latency is from the cost model's.

The cost model (`services.router.cost`) predicts an expert's latency from its reference
per-token times, its device's speed factor and its link. `LatencyTelemetry` keeps, per expert,
an EWMA of `measured / modelled` over finished requests (both for the request's ACTUAL token
counts, so the ratio learns the device and its load, not the request's length) and multiplies
later predictions by it. The same class keeps energy's `measured / modelled` ratio where
experts report measured joules (`Predictor.energy_of`: NVML, Jetson rails or RAPL on the
expert's host); elsewhere energy stays modelled (power x modelled compute time).

The coarse selection depends on these predictions, so `version` moves whenever some expert's
correction has drifted by more than `resolve_ratio` since the last move; the router re-solves
(and drops its cached selections) only then, not on every request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TelemetrySnapshot:
    expert_id: str
    correction: float
    samples: int


class LatencyTelemetry:
    def __init__(
        self,
        *,
        alpha: float = 0.2,
        resolve_ratio: float = 1.25,
        bounds: tuple[float, float] = (0.05, 50.0),
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if resolve_ratio <= 1:
            raise ValueError("resolve_ratio must be > 1")
        self.alpha = alpha
        self.resolve_ratio = resolve_ratio
        self.bounds = bounds
        self._ratio: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        self._at_version: dict[str, float] = {}
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def correction(self, expert_id: str) -> float:
        """measured / modelled latency, EWMA (1.0 before the first sample)."""
        return self._ratio.get(expert_id, 1.0)

    def observe(self, expert_id: str, modelled_s: float, measured_s: float) -> None:
        """One finished request: its modelled and its measured latency, seconds."""
        if not (modelled_s > 0 and math.isfinite(measured_s) and measured_s >= 0):
            return
        lo, hi = self.bounds
        ratio = min(max(measured_s / modelled_s, lo), hi)
        old = self._ratio.get(expert_id)
        new = ratio if old is None else old + self.alpha * (ratio - old)
        self._ratio[expert_id] = new
        self._samples[expert_id] = self._samples.get(expert_id, 0) + 1
        base = self._at_version.get(expert_id, 1.0)
        if max(new / base, base / new) > self.resolve_ratio:
            self._at_version[expert_id] = new
            self._version += 1

    def invalidate(self) -> None:
        """Move `version` (another correction the selection depends on has drifted)."""
        self._version += 1

    def snapshot(self) -> tuple[TelemetrySnapshot, ...]:
        return tuple(
            TelemetrySnapshot(e, self._ratio[e], self._samples[e]) for e in sorted(self._ratio)
        )
