"""Reference per-token times of the shipped experts, measured on the reference machine (the
2-core AMD EPYC box, torch 2.13 CPU, each expert in its registry default quantisation).

- decode: `make bench-edge` (docs/bench/edge.json, 64 new tokens, prefill included, best of 2):
  smollm2 int4 64.6 tok/s, gemma3 int8 30.6 tok/s, qwen05 int4 39.2 tok/s. qwen15 int4 was not
  in that table; 60 ms/token is an estimate from `make bench-collab`'s cloud-only decode (111
  ms/token on ONE core, both halves) scaled to two cores.
- prefill: `make gate-data` teacher-forced scoring time per prompt (~40 tokens each;
  docs/bench/gate.md): 0.06 / 0.12 / 0.18 / 0.84 s per prompt.

The router's cost model scales these by each device profile's speed factor; its latency
telemetry then corrects them per device from what it actually measures. A deployment can
override them per expert in its configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ReferenceTiming:
    decode_s_per_token: float
    prefill_s_per_token: float


REFERENCE_TIMINGS: Mapping[str, ReferenceTiming] = MappingProxyType(
    {
        "smollm2": ReferenceTiming(decode_s_per_token=1 / 64.6, prefill_s_per_token=0.0015),
        "gemma3": ReferenceTiming(decode_s_per_token=1 / 30.6, prefill_s_per_token=0.0030),
        "qwen05": ReferenceTiming(decode_s_per_token=1 / 39.2, prefill_s_per_token=0.0045),
        "qwen15": ReferenceTiming(decode_s_per_token=0.060, prefill_s_per_token=0.021),
    }
)

# Where the shipped cluster runs each expert (issue 4: edge experts on Jetson AGX Orin, the
# full Qwen2.5-Coder-1.5B on a GPU box); a deployment's configuration may say otherwise.
DEFAULT_DEVICES: Mapping[str, str] = MappingProxyType(
    {
        "smollm2": "jetson-agx-orin",
        "gemma3": "jetson-agx-orin",
        "qwen05": "jetson-agx-orin",
        "qwen15": "rtx-4090",
    }
)
