"""The meter interface: cumulative joules, and a context that gives a span's joules.

A meter's `source` says where its figures come from: "measured:nvml", "measured:jetson",
"measured:rapl", or "modelled" (power x time from an assumed power, nothing read).
A span measures the whole device (GPU, module or CPU package) while it runs: requests
served concurrently each see the energy of the whole batch in their span.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

MODELLED = "modelled"


@dataclass
class EnergySpan:
    """Filled in when the `measure()` block exits."""

    source: str
    joules: float = 0.0
    seconds: float = 0.0

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured:")


class EnergyMeter(Protocol):
    source: str

    def read_joules(self) -> float:
        """Joules since an arbitrary origin, never decreasing."""
        ...


@contextmanager
def measure(
    meter: EnergyMeter, clock: Callable[[], float] = time.perf_counter
) -> Iterator[EnergySpan]:
    """`with measure(meter) as span: ...` -> span.joules, span.seconds for the block."""
    span = EnergySpan(meter.source)
    t0, j0 = clock(), meter.read_joules()
    try:
        yield span
    finally:
        span.joules = max(0.0, meter.read_joules() - j0)
        span.seconds = clock() - t0


class ModelledMeter:
    """No power reading: joules = an assumed power x elapsed time. Says so in `source`."""

    source = MODELLED

    def __init__(self, power_w: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if power_w < 0:
            raise ValueError("power_w must be >= 0")
        self.power_w = power_w
        self._clock = clock
        self._t0 = clock()

    def read_joules(self) -> float:
        return self.power_w * (self._clock() - self._t0)

    def describe(self) -> str:
        return f"modelled: {self.power_w:g} W assumed, nothing measured"
