"""The router's own Prometheus metrics (per-expert request metrics come from each model id's
front end, `tandem.api.metrics.ApiMetrics`, namespaced per model id).

- `tandem_router_routed_total{selection, expert}`: answered requests by who answered.
- `tandem_router_expert_failures_total{expert}`: expert calls that failed and were routed around
  (or ended the request when none was left).
- `tandem_router_budget_infeasible_total{param}`: 400s for budgets no expert meets.
- `tandem_router_best_effort_total`: requests served although predicted over budget.
- `tandem_router_energy_joules`: MODELLED energy per answered request (histogram).
- `tandem_router_latency_seconds{kind=predicted|measured}`: per answered request.
- `tandem_router_feature_seconds`: gate feature computation time.
- `tandem_router_selection_solves_total`, `tandem_router_selection_cache_hits_total`,
  `tandem_router_latency_correction{expert}` (telemetry's measured/modelled EWMA): read from the
  selector and the telemetry at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.router.admission import Admission
from services.router.moe2 import Moe2Selector
from services.router.report import RouteReport
from services.router.telemetry import LatencyTelemetry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENERGY_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.routed = Counter(
            "tandem_router_routed",
            "Answered requests by selection mode and answering expert",
            ["selection", "expert"],
            registry=registry,
        )
        self.expert_failures = Counter(
            "tandem_router_expert_failures",
            "Expert calls that failed (routed around when another expert was left)",
            ["expert"],
            registry=registry,
        )
        self.infeasible = Counter(
            "tandem_router_budget_infeasible",
            "Requests refused (400) because no expert is predicted to meet the budget",
            ["param"],
            registry=registry,
        )
        self.best_effort = Counter(
            "tandem_router_best_effort",
            "Requests served although predicted over budget (best_effort)",
            registry=registry,
        )
        self.energy = Histogram(
            "tandem_router_energy_joules",
            "Modelled (not measured) energy per answered request",
            buckets=ENERGY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "tandem_router_latency_seconds",
            "Predicted and measured end-to-end latency per answered request",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.features = Histogram(
            "tandem_router_feature_seconds",
            "Time to compute the gate's features of one prompt",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, report: RouteReport) -> None:
        self.routed.labels(selection=report.selection, expert=report.answered_by or "").inc()
        if not report.budget_met:
            self.best_effort.inc()
        self.energy.observe(report.energy_j)
        self.latency.labels(kind="predicted").observe(report.latency_predicted_ms / 1e3)
        if report.latency_ms is not None:
            self.latency.labels(kind="measured").observe(report.latency_ms / 1e3)

    def watch_admission(self, admission: Admission) -> None:
        """Requests in flight and refused (429) by the router's admission control."""
        self.registry.register(_AdmissionCollector(admission))

    def watch(self, selector: Moe2Selector | None, telemetry: LatencyTelemetry) -> None:
        """Export the selector's solve/cache counters and the telemetry at scrape time."""
        self.registry.register(_StateCollector(selector, telemetry))


class _StateCollector(Collector):
    def __init__(self, selector: Moe2Selector | None, telemetry: LatencyTelemetry) -> None:
        self.selector = selector
        self.telemetry = telemetry

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.selector is not None:
            yield CounterMetricFamily(
                "tandem_router_selection_solves",
                "Coarse-level solves (cache misses after a budget class or profile change)",
                value=self.selector.solves,
            )
            yield CounterMetricFamily(
                "tandem_router_selection_cache_hits",
                "Requests whose coarse selection came from the cache",
                value=self.selector.cache_hits,
            )
        correction = GaugeMetricFamily(
            "tandem_router_latency_correction",
            "Measured / modelled latency per expert (EWMA; 1 before any sample)",
            labels=["expert"],
        )
        for snap in self.telemetry.snapshot():
            correction.add_metric([snap.expert_id], snap.correction)
        yield correction


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "tandem_router_in_flight",
            "Generation requests holding an admission slot",
            value=self.admission.in_flight,
        )
        refused = CounterMetricFamily(
            "tandem_router_admission_refused",
            "Requests refused with 429 by admission control",
            labels=["reason"],
        )
        for reason in ("router_full", "per_client"):
            refused.add_metric([reason], self.admission.refused[reason])
        yield refused
