"""The edge node's metrics: the OpenAI front end's (`tandem.api.metrics.ApiMetrics`, namespace
`tandem_edge`) plus, in collaborative mode, the CloudLink's counters read at scrape time:
`tandem_edge_cloud_token_requests_total`, `_cloud_token_failures_total`, `_cloud_uploads_total`,
`_cloud_recoveries_total`, `_cloud_bytes_up_total`, `_cloud_bytes_down_total`,
`_cloud_positions_sent_total` (bytes_up / positions_sent = bytes uploaded per token),
`_cloud_round_trip_seconds_total`, `_cloud_available` (0 while the circuit is open),
`_cloud_expected_ms` and `_tau_effective` (the latency-aware threshold in use).
With `bind_energy`: `tandem_edge_energy_joules_total{source}`, the energy of the model steps
(source "measured:nvml|jetson|rapl" or "modelled"); per request it is in usage.tandem.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.api.metrics import ApiMetrics


class EdgeMetrics(ApiMetrics):
    """The front end's metrics and, with `bind_cloud_link`, the CloudLink's."""

    def bind_cloud_link(self, link: Any, tau_now: Callable[[], float]) -> None:
        """Export a CloudLink's counters (collaborative mode) at every scrape."""
        self.registry.register(_CloudLinkCollector(link, tau_now, self.model_name))

    def bind_energy(self, stats: Any, source: str | None) -> None:
        """Export the engine's step energy (`EngineStats.energy_j`) at every scrape."""
        if source is not None:
            self.registry.register(_EnergyCollector(stats, source, self.model_name))


class _EnergyCollector(Collector):
    def __init__(self, stats: Any, source: str, model: str) -> None:
        self._stats, self._source, self._model = stats, source, model

    def collect(self):
        family = CounterMetricFamily(
            "tandem_edge_energy_joules",
            "Energy of the model steps (measured:<meter> or modelled).",
            labels=["model", "source"],
        )
        family.add_metric([self._model, self._source], float(self._stats.energy_j))
        yield family


class _CloudLinkCollector(Collector):
    _COUNTERS = (
        ("token_requests", "Token requests sent to the cloud."),
        ("token_failures", "Token requests that failed or timed out (edge fell back)."),
        ("uploads", "Incremental context uploads acknowledged by the cloud."),
        ("recoveries", "Requests resent after the cloud lost a session or position."),
        ("bytes_up", "Bytes sent to the cloud (uploads + token requests)."),
        ("bytes_down", "Bytes received from the cloud."),
        ("positions_sent", "Split-layer states sent to the cloud (resends included)."),
        ("round_trip_s", "Time spent in answered token requests."),
    )

    def __init__(self, link: Any, tau_now: Callable[[], float], model: str) -> None:
        self._link, self._tau_now, self._model = link, tau_now, model

    def collect(self):
        c = self._link.counters
        for name, doc in self._COUNTERS:
            metric = name.replace("round_trip_s", "round_trip_seconds")
            family = CounterMetricFamily(f"tandem_edge_cloud_{metric}", doc, labels=["model"])
            family.add_metric([self._model], float(getattr(c, name)))
            yield family
        expected = self._link.expected_ms()
        for name, doc, value in (
            ("cloud_available", "1 unless the cloud circuit is open.", self._link.available()),
            ("cloud_expected_ms", "Predicted cloud round trip.", expected or math.nan),
            ("tau_effective", "Latency-aware exit threshold in use.", self._tau_now()),
        ):
            family = GaugeMetricFamily(f"tandem_edge_{name}", doc, labels=["model"])
            family.add_metric([self._model], float(value))
            yield family
