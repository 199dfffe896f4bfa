"""Prometheus metrics of one attention worker, on an explicit `CollectorRegistry`.

Names (namespace `tandem_attn`, every metric has a `worker` label: the worker's index in
its pool, so N workers scraped together stay apart; label sets are bounded, layers < 64):

- `_requests_total{rpc,code}`: calls by status code (Attend and LoadKV count messages)
- `_item_errors_total{code}`: Attend items answered with an ItemError
- `_attend_seconds{layer}` (histogram): an Attend message from its arrival to its reply
  (a phase-Q message is counted with its phase-KV reply), per layer
- `_compute_seconds{phase}` (histogram): time on the compute thread per message
- `_batch_items` (histogram): items (sequences) per Attend message
- `_load_waits_total{outcome}` (ok, timeout): Attend items that had to wait for LoadKV
- `_load_wait_seconds` (histogram): how long they waited
- `_loaded_rows_total`: KV rows applied by LoadKV
- read from the store at scrape time: `_kv_bytes`, `_capacity_bytes`, `_sessions` (gauges),
  `_evictions_total`
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.attention_pool.kv_store import KVStore

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AttnMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, worker: str = "0", namespace: str = "tandem_attn"
    ) -> None:
        self.registry = registry
        self.worker = worker
        self.namespace = namespace
        ns, w = namespace, ["worker"]

        def histogram(name: str, doc: str, labels: list[str], buckets) -> Histogram:
            return Histogram(name, doc, labels, namespace=ns, registry=registry, buckets=buckets)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, namespace=ns, registry=registry)

        self.requests = counter(
            "requests", "Calls (stream messages) by status code.", [*w, "rpc", "code"]
        )
        self.item_errors = counter(
            "item_errors", "Attend items answered with an error.", [*w, "code"]
        )
        self.attend = histogram(
            "attend_seconds",
            "Attend message latency, arrival to reply, per layer.",
            [*w, "layer"],
            LATENCY_BUCKETS,
        )
        self.compute = histogram(
            "compute_seconds", "Compute-thread time per message.", [*w, "phase"], LATENCY_BUCKETS
        )
        self.batch = histogram("batch_items", "Items per Attend message.", w, BATCH_BUCKETS)
        self.waits = counter("load_waits", "Attend items that waited for LoadKV.", [*w, "outcome"])
        self.wait_time = histogram(
            "load_wait_seconds", "Time Attend items waited for LoadKV.", w, WAIT_BUCKETS
        )
        self.loaded_rows = counter("loaded_rows", "KV rows applied by LoadKV.", w)

    def bind_store(self, store: KVStore) -> None:
        """KV bytes, sessions and evictions are read from `store` at scrape time."""
        self.registry.register(_StoreCollector(store, self.namespace, self.worker))

    def record_request(self, rpc: str, code: str) -> None:
        self.requests.labels(self.worker, rpc, code).inc()

    def record_item_error(self, code: str) -> None:
        self.item_errors.labels(self.worker, code).inc()

    def record_attend(self, layer: int, seconds: float, items: int) -> None:
        self.attend.labels(self.worker, str(layer)).observe(seconds)
        self.batch.labels(self.worker).observe(items)

    def record_compute(self, phase: str, seconds: float) -> None:
        self.compute.labels(self.worker, phase).observe(seconds)

    def record_wait(self, ok: bool, seconds: float) -> None:
        self.waits.labels(self.worker, "ok" if ok else "timeout").inc()
        self.wait_time.labels(self.worker).observe(seconds)

    def record_loaded(self, rows: int) -> None:
        self.loaded_rows.labels(self.worker).inc(rows)


class _StoreCollector(Collector):
    def __init__(self, store: KVStore, namespace: str, worker: str) -> None:
        self.store, self.ns, self.worker = store, namespace, worker

    def collect(self) -> Iterator[Metric]:
        st = self.store.stats()
        for name, doc, value in (
            ("kv_bytes", "Bytes of KV buffers allocated.", st.kv_bytes),
            ("capacity_bytes", "KV capacity of this worker.", st.capacity_bytes),
            ("sessions", "Sessions holding KV here.", st.sessions),
        ):
            g = GaugeMetricFamily(f"{self.ns}_{name}", doc, labels=["worker"])
            g.add_metric([self.worker], float(value))
            yield g
        ev = CounterMetricFamily(
            f"{self.ns}_evictions", "Sessions evicted (LRU) to make room.", labels=["worker"]
        )
        ev.add_metric([self.worker], float(st.evictions))
        yield ev
