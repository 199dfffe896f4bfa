"""Latency-aware confidence threshold for collaborative mode (CE-CoLLM v2).

A token whose edge exits are all below tau goes to the cloud. When the cloud round trip is
expected to cost more than `budget_ms` (measured RTT + the cloud's reported compute time
scaled by its load), the threshold is lowered towards `tau_min` in proportion:

    tau_eff = tau_min + (tau - tau_min) * min(1, budget_ms / expected_ms)

so a slow or loaded cloud is asked less often. tau >= 1.0 is the exact mode (every token
the edge cannot finish goes to the cloud) and is never lowered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TauPolicy:
    tau: float = 0.9
    tau_min: float = 0.5
    budget_ms: float = 200.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau_min <= self.tau <= 1.0:
            raise ValueError(f"need 0 <= tau_min ({self.tau_min}) <= tau ({self.tau}) <= 1")
        if self.budget_ms <= 0:
            raise ValueError("budget_ms must be > 0")

    def effective(self, expected_ms: float | None) -> float:
        if self.tau >= 1.0 or expected_ms is None or expected_ms <= self.budget_ms:
            return self.tau
        return self.tau_min + (self.tau - self.tau_min) * self.budget_ms / expected_ms
