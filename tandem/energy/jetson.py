"""Jetson power rails: the INA3221 monitors in sysfs, instantaneous power integrated over
time (trapezoids between samples). Two driver layouts:

- JetPack 5+ (mainline hwmon driver): /sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/
  hwmon*/in<N>_label, in<N>_input (mV), curr<N>_input (mA), N = 1..3;
- L4T 32 (JetPack 4, the ina3221x IIO driver): /sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/
  iio:device*/rail_name_<i>, in_power<i>_input (mW), i = 0..2.

The module's input rail (a label ending in IN: VDD_IN, POM_5V_IN, 5V_IN) is the total and
is used alone when present; otherwise every rail is summed (AGX Xavier: GPU, CPU, SOC, ...).
`read_joules` samples; `start()` adds a background sampler (every `period_s`) so long spans
are integrated finely; tests call `read_joules` with a fake clock instead.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE = "measured:jetson"
DEFAULT_ROOT = Path("/sys/bus/i2c/drivers")
_INPUT_RAIL = re.compile(r"(^|_)IN$")


@dataclass(frozen=True)
class Rail:
    label: str
    power_mw: Callable[[], float]


def _num(path: Path) -> float:
    return float(path.read_text().strip())


def _hwmon_rails(root: Path) -> list[Rail]:
    rails = []
    for hw in sorted(root.glob("ina3221/*/hwmon/hwmon*")):
        for label_file in sorted(hw.glob("in*_label")):
            n = label_file.name[2:].split("_")[0]
            volt, curr = hw / f"in{n}_input", hw / f"curr{n}_input"
            if not (volt.exists() and curr.exists()):
                continue  # e.g. "sum of shunt voltages": no current of its own
            rails.append(
                Rail(
                    label_file.read_text().strip(),
                    lambda v=volt, c=curr: _num(v) * _num(c) / 1e3,  # mV * mA = uW
                )
            )
    return rails


def _iio_rails(root: Path) -> list[Rail]:
    rails = []
    for dev in sorted(root.glob("ina3221x/*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            i = name_file.name.rsplit("_", 1)[1]
            power = dev / f"in_power{i}_input"
            if power.exists():
                rails.append(Rail(name_file.read_text().strip(), lambda p=power: _num(p)))
    return rails


def discover_rails(root: Path = DEFAULT_ROOT) -> list[Rail]:
    """The rails to sum: the input rail(s) alone if any, else all readable rails."""
    found = []
    for rail in _hwmon_rails(root) + _iio_rails(root):
        try:
            rail.power_mw()
        except (OSError, ValueError):
            continue
        found.append(rail)
    inputs = [r for r in found if _INPUT_RAIL.search(r.label.upper())]
    return inputs or found


class JetsonMeter:
    source = SOURCE

    def __init__(
        self,
        rails: list[Rail],
        clock: Callable[[], float] = time.monotonic,
        period_s: float = 0.05,
    ) -> None:
        if not rails:
            raise ValueError("no Jetson power rails")
        self.rails = rails
        self._clock = clock
        self.period_s = period_s
        self._lock = threading.Lock()
        self._joules = 0.0
        self._t = clock()
        self._p = self._power_w()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _power_w(self) -> float:
        return sum(r.power_mw() for r in self.rails) / 1e3

    def read_joules(self) -> float:
        with self._lock:
            t, p = self._clock(), self._power_w()
            self._joules += 0.5 * (p + self._p) * max(0.0, t - self._t)
            self._t, self._p = t, p
            return self._joules

    def start(self) -> JetsonMeter:
        """Sample in a daemon thread every period_s (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jetson-power", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.read_joules()
            except (OSError, ValueError):
                return

    def describe(self) -> str:
        return f"measured: Jetson rails {', '.join(r.label for r in self.rails)}"


def find_jetson(root: Path = DEFAULT_ROOT, **kw) -> JetsonMeter | None:
    rails = discover_rails(root) if root.is_dir() else []
    return JetsonMeter(rails, **kw) if rails else None
