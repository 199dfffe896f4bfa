"""RAPL (Intel/AMD x86 hosts): /sys/class/powercap/intel-rapl:N/energy_uj, microjoules
since an arbitrary point, wrapping at max_energy_range_uj. Only the top-level package
domains (intel-rapl:N) are summed: their subdomains (intel-rapl:N:M, core/uncore/dram)
are parts of them. energy_uj is often readable by root only (since Linux 5.10)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SOURCE = "measured:rapl"
DEFAULT_ROOT = Path("/sys/class/powercap")
_PACKAGE = re.compile(r"^intel-rapl:\d+$")


@dataclass
class _Domain:
    energy: Path
    max_range_uj: int
    last_uj: int
    total_uj: int = 0


class RaplMeter:
    source = SOURCE

    def __init__(self, domains: list[Path]) -> None:
        if not domains:
            raise ValueError("no RAPL domains")
        self._domains = []
        for d in domains:
            max_range = int((d / "max_energy_range_uj").read_text())
            self._domains.append(_Domain(d / "energy_uj", max_range, _read(d / "energy_uj")))
        self.names = [_name(d) for d in domains]

    def read_joules(self) -> float:
        total = 0
        for d in self._domains:
            now = _read(d.energy)
            delta = now - d.last_uj
            if delta < 0:  # the counter wrapped
                delta += d.max_range_uj + 1
            d.total_uj += delta
            d.last_uj = now
            total += d.total_uj
        return total / 1e6

    def describe(self) -> str:
        return f"measured: RAPL {', '.join(self.names)}"


def _read(path: Path) -> int:
    return int(path.read_text().strip())


def _name(d: Path) -> str:
    try:
        return f"{d.name} ({(d / 'name').read_text().strip()})"
    except OSError:
        return d.name


def find_rapl(root: Path = DEFAULT_ROOT) -> RaplMeter | None:
    """A meter over the readable package domains under `root`, or None."""
    if not root.is_dir():
        return None
    domains = []
    for d in sorted(root.iterdir()):
        if not _PACKAGE.match(d.name):
            continue
        try:
            _read(d / "energy_uj")
            int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # not readable (permissions) or not a counter
        domains.append(d)
    return RaplMeter(domains) if domains else None
