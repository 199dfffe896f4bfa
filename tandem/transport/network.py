"""An emulated network link between an edge and the cloud, applied in the transport.

Each direction is a FIFO pipe of `bandwidth_bps`: a message of n bytes starts when the
pipe is free, occupies it for 8n / bandwidth seconds, and arrives rtt/2 after it left.
`send` sleeps until the message has arrived, so concurrent messages queue behind each
other exactly as on a serial link. Loopback gRPC still carries the bytes; the emulated
delay comes on top of its (sub-millisecond) cost.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_bps: float  # bits per second, each direction
    rtt_s: float

    def __post_init__(self) -> None:
        if self.bandwidth_bps <= 0 or self.rtt_s < 0:
            raise ValueError(f"invalid link {self}")

    @property
    def name(self) -> str:
        return f"{self.bandwidth_bps / 1e6:g}Mbit/{self.rtt_s * 1e3:g}ms"

    @staticmethod
    def parse(text: str) -> LinkProfile:
        """'10mbit/20ms' -> 10 Mbit/s, 20 ms RTT."""
        try:
            bw, rtt = text.lower().replace(" ", "").split("/")
            return LinkProfile(
                float(bw.removesuffix("mbit")) * 1e6, float(rtt.removesuffix("ms")) / 1e3
            )
        except ValueError as exc:
            raise ValueError(f"link {text!r}: expected e.g. '10mbit/20ms'") from exc


@dataclass
class LinkStats:
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0
    delay_s: float = 0.0  # emulated time spent in transit (queueing + serialisation + rtt/2)


class EmulatedLink:
    """Delays messages on one edge's link; use from a single asyncio event loop."""

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self.stats = LinkStats()
        self._free_at: dict[Direction, float] = {"up": 0.0, "down": 0.0}

    async def send(self, nbytes: int, direction: Direction) -> float:
        """Wait until a message of `nbytes` has crossed; returns the delay it saw."""
        now = time.perf_counter()
        start = max(now, self._free_at[direction])
        self._free_at[direction] = start + nbytes * 8 / self.profile.bandwidth_bps
        arrival = self._free_at[direction] + self.profile.rtt_s / 2
        if direction == "up":
            self.stats.bytes_up += nbytes
        else:
            self.stats.bytes_down += nbytes
        self.stats.messages += 1
        self.stats.delay_s += arrival - now
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        return arrival - now
