"""What the router tells the client about how a request was served.

`RouteReport` goes into `usage.tandem.router` (the usage extension; streamed responses carry it
in the final usage chunk when `stream_options.include_usage` is set) and into headers:

| header                          | value                                                   |
|---------------------------------|---------------------------------------------------------|
| `x-tandem-expert`               | the expert whose answer was returned                    |
| `x-tandem-experts`              | every expert that ran, comma-separated                  |
| `x-tandem-energy-j`             | energy, J: measured where the experts report it         |
| `x-tandem-energy-source`        | measured / modelled / mixed (which the figure is)       |
| `x-tandem-latency-predicted-ms` | the router's latency prediction when it chose           |
| `x-tandem-latency-ms`           | measured latency (non-streaming responses only)         |
| `x-tandem-budget-met`           | whether the prediction met the budgets                  |

A streamed response sends its headers before generation ends, so there the energy header is
the estimate for `max_tokens` output tokens and the measured latency is only in the usage
chunk; the usage chunk's `energy_j` is for the tokens actually generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

EXPERT_HEADER = "x-tandem-expert"
EXPERTS_HEADER = "x-tandem-experts"
ENERGY_HEADER = "x-tandem-energy-j"
ENERGY_SOURCE_HEADER = "x-tandem-energy-source"
PREDICTED_HEADER = "x-tandem-latency-predicted-ms"
MEASURED_HEADER = "x-tandem-latency-ms"
BUDGET_MET_HEADER = "x-tandem-budget-met"


@dataclass
class RouteReport:
    """Filled in while a request is routed (mutable: the front end reads it for headers).

    - `selection`: "auto" (MoE²) or "direct" (the client named the expert).
    - `subset`: the coarse level's S; `weights`: the gate's weights inside S (auto only).
    - `experts`: every expert that ran (answered or not); `answered_by`: whose answer was
      returned; `failed`: experts that failed and were routed around.
    - `energy_j`: energy of every expert that ran (estimate for max_tokens until the answer
      is in, then for the actual tokens); `energy_source` says what it is: "modelled",
      "measured" (every expert reported measured joules) or "mixed"; `energy_sources`
      per expert ("measured:nvml", "measured:jetson", "measured:rapl" or "modelled").
    - `latency_predicted_ms` / `latency_ms`: predicted when chosen / measured end to end.
    - `budget`: the request's budgets after defaults; `budget_met`: predicted to fit them.
    - `aggregation`: how the answer was chosen among the experts that ran.
    """

    selection: str
    budget: dict[str, Any]
    subset: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    top_k: int = 1
    experts: list[str] = field(default_factory=list)
    answered_by: str | None = None
    failed: list[str] = field(default_factory=list)
    energy_j: float = 0.0
    energy_source: str = "modelled"
    energy_sources: dict[str, str] = field(default_factory=dict)
    latency_predicted_ms: float = 0.0
    latency_ms: float | None = None
    budget_met: bool = True
    aggregation: str = "single"

    def set_energy(self, per_expert: dict[str, tuple[float, str]]) -> None:
        """The answered experts' (joules, source): their sum, and what it is."""
        self.energy_j = sum(j for j, _ in per_expert.values())
        self.energy_sources = {e: s for e, (_, s) in per_expert.items()}
        measured = [s.startswith("measured") for s in self.energy_sources.values()]
        if measured and all(measured):
            self.energy_source = "measured"
        else:
            self.energy_source = "mixed" if any(measured) else "modelled"

    def usage(self) -> dict[str, Any]:
        """JSON-ready copy (lists and dicts copied one level; their items are immutable)."""
        out: dict[str, Any] = {}
        for f in _FIELDS:
            value = getattr(self, f)
            out[f] = value.copy() if isinstance(value, list | dict) else value
        return {"router": out}

    def headers(self, final: bool) -> dict[str, str]:
        out = {
            EXPERTS_HEADER: ",".join(self.experts),
            ENERGY_HEADER: f"{self.energy_j:.6g}",
            ENERGY_SOURCE_HEADER: self.energy_source,
            PREDICTED_HEADER: f"{self.latency_predicted_ms:.1f}",
            BUDGET_MET_HEADER: "true" if self.budget_met else "false",
        }
        expert = self.answered_by or (self.experts[0] if self.experts else None)
        if expert:
            out[EXPERT_HEADER] = expert
        if final and self.latency_ms is not None:
            out[MEASURED_HEADER] = f"{self.latency_ms:.1f}"
        return out


_FIELDS = tuple(f.name for f in fields(RouteReport))
