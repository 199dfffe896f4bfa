"""Device and expert profiles: what the router's cost model knows about each expert.

Every number in the shipped device profiles is MODELLED, not measured. Compute time is this
machine's measured CPU time scaled by a per-device speed factor; energy is power x time (see
`services.router.cost`). No power meter was read on any device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class DeviceProfile:
    """One device class an expert can run on (modelled, not measured).

    - `power_w`: average electrical power while the expert computes (prefill + decode), W.
    - `tx_power_w`: power drawn while the request and answer cross the link, W.
    - `speed_factor`: compute-time multiplier relative to the measured CPU time of the
      reference machine (the 2-core AMD EPYC box the experts were timed on): > 1 slower,
      < 1 faster.
    - `up_bps` / `down_bps`: link bandwidth towards / from the device, bits per second.
    - `rtt_s`: link round-trip time, seconds.
    """

    name: str
    power_w: float
    tx_power_w: float
    speed_factor: float
    up_bps: float
    down_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a device profile needs a name")
        for field in ("power_w", "tx_power_w", "rtt_s"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        for field in ("speed_factor", "up_bps", "down_bps"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")


JETSON_AGX_ORIN = DeviceProfile(
    name="jetson-agx-orin",
    power_w=30.0,
    tx_power_w=2.0,
    speed_factor=0.5,
    up_bps=50e6,
    down_bps=100e6,
    rtt_s=0.010,
)
"""NVIDIA Jetson AGX Orin (64 GB), modelled.

- Power: NVIDIA specifies configurable power modes of 15 W to 60 W for the AGX Orin module;
  30 W is the middle mode and is what we assume while an expert computes.
- Speed: 0.5 x the 2-core EPYC CPU time is an assumption for small (0.1-2B) decoders on the
  Orin GPU at batch 1, where decode is memory-bandwidth bound (204.8 GB/s LPDDR5 vs the few
  GB/s two CPU cores draw). It is deliberately conservative; not measured.
- Link: an edge box on Wi-Fi 6 / 5G next to the user: 50 Mbit/s up, 100 Mbit/s down, 10 ms RTT
  (assumed). Transmit power 2 W (assumed radio + NIC share).
"""

RTX_4090 = DeviceProfile(
    name="rtx-4090",
    power_w=450.0,
    tx_power_w=2.0,
    speed_factor=0.1,
    up_bps=1e9,
    down_bps=1e9,
    rtt_s=0.020,
)
"""NVIDIA GeForce RTX 4090 edge server, modelled.

- Power: 450 W is the card's nominal total board power (NVIDIA spec); we charge the full
  figure while it computes, an upper-end assumption (small-batch decode draws less).
- Speed: 0.1 x the 2-core EPYC CPU time (assumed; ~1 TB/s GDDR6X and far more compute).
- Link: a wired edge server one hop further away: 1 Gbit/s both ways, 20 ms RTT (assumed).
  Transmit power 2 W (assumed).
"""

CPU = DeviceProfile(
    name="cpu",
    power_w=10.0,
    tx_power_w=0.5,
    speed_factor=1.0,
    up_bps=10e9,
    down_bps=10e9,
    rtt_s=0.0002,
)
"""This machine: 2 cores of an AMD EPYC server CPU (the reference; speed factor 1 by definition).

- Power: 10 W is the assumed share of a ~280 W, 64-core EPYC socket for 2 busy cores plus
  their slice of uncore/memory power (280 / 64 * 2 ~ 9 W, rounded up); modelled.
- Link: loopback / same-host container network: 10 Gbit/s, 0.2 ms RTT (assumed), 0.5 W.
"""

DEVICE_PROFILES: Mapping[str, DeviceProfile] = MappingProxyType(
    {p.name: p for p in (JETSON_AGX_ORIN, RTX_4090, CPU)}
)
"""The shipped profiles by name (read-only)."""


def device_profile(name: str) -> DeviceProfile:
    """The shipped profile called `name`; KeyError lists the known names."""
    try:
        return DEVICE_PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_PROFILES))
        raise KeyError(f"unknown device profile {name!r}; known: {known}") from None


@dataclass(frozen=True)
class ExpertSpec:
    """One expert as the cost model sees it.

    - `expert_id`: the model id clients may ask for (e.g. "smollm2").
    - `device`: the device profile it runs on.
    - `decode_s_per_token` / `prefill_s_per_token`: measured on the reference CPU (inputs; the
      router's telemetry EWMA can replace them); scaled by `device.speed_factor`.
    - `replicas`: how many replicas serve it (replica choice is a separate step; the cost model
      prices one request on one replica).
    """

    expert_id: str
    device: DeviceProfile
    decode_s_per_token: float
    prefill_s_per_token: float
    replicas: int = 1

    def __post_init__(self) -> None:
        if not self.expert_id:
            raise ValueError("an expert needs an id")
        if self.decode_s_per_token < 0 or self.prefill_s_per_token < 0:
            raise ValueError("per-token times must be >= 0")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
