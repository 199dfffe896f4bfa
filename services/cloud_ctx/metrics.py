"""Prometheus metrics of the cloud context manager, on an explicit `CollectorRegistry`.

Names (namespace `tandem_cloud`, every metric has a `model` label):

- `_requests_total{rpc,code}`: gRPC calls (Upload counts stream messages) by status code
- `_tokens_total`: tokens answered (NextToken OK)
- `_uploads_total{via}`, `_uploaded_bytes_total{via}`, `_uploaded_positions_total{via}`:
  hidden-state messages, wire bytes (data + scales) and positions received, `via` = upload
  (the Upload stream) or token (rows carried by NextToken). Bytes per token =
  sum(uploaded_bytes_total) / tokens_total.
- `_catch_up_rows` (histogram): rows one token request added to its batch's forward
- `_token_batch_size` (histogram): token requests (sessions) answered by one forward
- `_request_compute_seconds{rpc}`, `_request_queue_seconds{rpc}` (histograms): time on the
  model thread, and waiting for it
- read from the manager at scrape time: `_sessions`, `_session_bytes` (gauges),
  `_evictions_total{reason}` (ttl, lru, release, stale), `_rebuilds_total` (sessions
  rebuilt from the Redis log)
- `_energy_joules_total{source}`, `_request_energy_joules{rpc,source}` (histogram): energy of
  the model thread's work (a batched forward shared equally by its requests); source is
  "measured:nvml|jetson|rapl" where the hardware reports it, else "modelled"
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.cloud_ctx.context_manager import CloudContextManager

CATCH_UP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
ENERGY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)


class CloudMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, model_name: str, namespace: str = "tandem_cloud"
    ) -> None:
        self.registry = registry
        self.model_name = model_name
        self.namespace = namespace
        ns, m = namespace, ["model"]

        def counter(name: str, doc: str, labels: list[str] = m) -> Counter:
            return Counter(name, doc, labels, namespace=ns, registry=registry)

        self.requests = counter("requests", "gRPC calls by status code.", [*m, "rpc", "code"])
        self.tokens = counter("tokens", "Tokens answered.")
        self.uploads = counter("uploads", "Hidden-state messages received.", [*m, "via"])
        self.uploaded_bytes = counter(
            "uploaded_bytes", "Hidden-state wire bytes received.", [*m, "via"]
        )
        self.uploaded_positions = counter(
            "uploaded_positions", "Hidden-state positions received.", [*m, "via"]
        )
        self.catch_up_rows = Histogram(
            "catch_up_rows",
            "Rows run in one token request's forward (pending + the asked one).",
            m,
            namespace=ns,
            registry=registry,
            buckets=CATCH_UP_BUCKETS,
        )
        self.batch_size = Histogram(
            "token_batch_size",
            "Token requests (sessions) answered by one batched forward.",
            m,
            namespace=ns,
            registry=registry,
            buckets=CATCH_UP_BUCKETS[:8],
        )
        self.compute = Histogram(
            "request_compute_seconds",
            "Time a request spent on the model thread.",
            [*m, "rpc"],
            namespace=ns,
            registry=registry,
            buckets=COMPUTE_BUCKETS,
        )
        self.queue = Histogram(
            "request_queue_seconds",
            "Time a request waited for the model thread.",
            [*m, "rpc"],
            namespace=ns,
            registry=registry,
            buckets=COMPUTE_BUCKETS,
        )

        self.energy = counter("energy_joules", "Energy of the model thread's work.", [*m, "source"])
        self.request_energy = Histogram(
            "request_energy_joules",
            "Energy per request (its share of its batch's forward).",
            [*m, "rpc", "source"],
            namespace=ns,
            registry=registry,
            buckets=ENERGY_BUCKETS,
        )

    def bind_manager(self, manager: CloudContextManager) -> None:
        """Sessions, memory, evictions and rebuilds are read from `manager` at scrape time."""
        self.registry.register(_ManagerCollector(manager, self.namespace, self.model_name))

    def record_request(self, rpc: str, code: str) -> None:
        self.requests.labels(self.model_name, rpc, code).inc()

    def record_hidden(self, via: str, nbytes: int, positions: int) -> None:
        self.uploads.labels(self.model_name, via).inc()
        self.uploaded_bytes.labels(self.model_name, via).inc(nbytes)
        self.uploaded_positions.labels(self.model_name, via).inc(positions)

    def record_timing(self, rpc: str, queue_s: float, compute_s: float) -> None:
        self.queue.labels(self.model_name, rpc).observe(queue_s)
        self.compute.labels(self.model_name, rpc).observe(compute_s)

    def record_energy(self, rpc: str, joules: float, requests: int, source: str) -> None:
        self.energy.labels(self.model_name, source).inc(joules)
        for _ in range(requests):
            self.request_energy.labels(self.model_name, rpc, source).observe(joules / requests)

    def record_batch(self, size: int) -> None:
        self.batch_size.labels(self.model_name).observe(size)

    def record_token(self, catch_up_rows: int) -> None:
        self.tokens.labels(self.model_name).inc()
        if catch_up_rows:  # 0: a retry answered from the kept reply
            self.catch_up_rows.labels(self.model_name).observe(catch_up_rows)


class _ManagerCollector(Collector):
    def __init__(self, manager: CloudContextManager, namespace: str, model: str) -> None:
        self.manager, self.ns, self.model = manager, namespace, model

    def collect(self) -> Iterator[Metric]:
        store = self.manager.store
        try:  # a scrape must not fail because the model thread changed the store
            n_sessions, nbytes = float(len(store)), float(store.nbytes())
        except RuntimeError:
            n_sessions, nbytes = math.nan, math.nan
        for name, doc, value in (
            ("sessions", "Sessions held in memory.", n_sessions),
            ("session_bytes", "Bytes of KV and pending rows held.", nbytes),
        ):
            g = GaugeMetricFamily(f"{self.ns}_{name}", doc, labels=["model"])
            g.add_metric([self.model], value)
            yield g
        ev = CounterMetricFamily(
            f"{self.ns}_evictions",
            "Sessions dropped from memory by reason (ttl, lru, release, stale).",
            labels=["model", "reason"],
        )
        for reason, count in dict(store.evictions).items():
            ev.add_metric([self.model, reason], count)
        yield ev
        rb = CounterMetricFamily(
            f"{self.ns}_rebuilds", "Sessions rebuilt from the Redis log.", labels=["model"]
        )
        rb.add_metric([self.model], self.manager.rebuilds)
        yield rb
        kv = CounterMetricFamily(
            f"{self.ns}_kv_rebuilds",
            "Sessions recomputed because the attention pool lost their KV (offload mode).",
            labels=["model"],
        )
        kv.add_metric([self.model], self.manager.kv_rebuilds)
        yield kv
        for name, doc, value in (
            (
                "log_wait_seconds",
                "Time the model thread spent blocked on Redis log writes (in line, or "
                "waiting for an overlapped append after the forward).",
                self.manager.log_wait_s,
            ),
            (
                "overlap_retries",
                "Token requests run again with in-line log writes after their overlapped "
                "append failed.",
                self.manager.overlap_retries,
            ),
        ):
            c = CounterMetricFamily(f"{self.ns}_{name}", doc, labels=["model"])
            c.add_metric([self.model], value)
            yield c
        traffic = getattr(getattr(self.manager.runner, "pool", None), "traffic", None)
        if traffic is None:  # local attention
            return
        for name, doc, value in (
            ("pool_sent_bytes", "Tensor bytes sent to the attention pool in Attend.", traffic.sent),
            ("pool_received_bytes", "Attention output bytes received.", traffic.received),
            ("pool_loaded_bytes", "Prefill KV bytes loaded into the pool.", traffic.loaded),
            (
                "pool_attend_calls",
                "Attend round trips (one per layer per micro-batch).",
                traffic.calls,
            ),
            ("pool_attend_seconds", "Time spent in Attend round trips.", traffic.call_s),
        ):
            c = CounterMetricFamily(f"{self.ns}_{name}", doc, labels=["model"])
            c.add_metric([self.model], value)
            yield c
