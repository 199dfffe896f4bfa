"""Prometheus metrics of an OpenAI HTTP front end (the edge node's, the router's per model id).

All metrics live on the `CollectorRegistry` passed in (no global registry), so tests and
several apps in one process never clash. Every metric carries a `model` label. Names
(with the `tandem_edge` namespace):

- `_time_to_first_token_seconds`, `_inter_token_latency_seconds`,
  `_e2e_request_latency_seconds` (histograms; intervals from `time.perf_counter`, measured
  from the moment the request was parsed)
- `_prompt_tokens_total`, `_generation_tokens_total` (counters)
- `_requests_total{finish_reason,status}`: finish_reason is stop|length|abort|error|none
  (none: rejected before generation), status the HTTP status sent
- `_generated_tokens_by_exit_layer_total{exit_layer}`: tokens produced at each exit layer;
  the share at `exit_layer == model_layers` is the full-depth fraction
- `_generated_tokens_by_source_total{source}`: edge | cloud | fallback (collaborative mode:
  cloud tokens over all tokens is the cloud request rate; fallback tokens were produced by
  the edge because the cloud was unreachable or too slow)
- `_model_layers` (gauge, n_layers of the engine), `_queue_depth` (gauge read from
  `engine.queue_depth()` at scrape time), `_requests_in_flight` (gauge)
- the edge node adds the CloudLink's counters (`services.edge_node.metrics.EdgeMetrics`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
    10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class ApiMetrics:
    """An OpenAI front end's metrics, registered on `registry`."""

    def __init__(
        self, registry: CollectorRegistry, *, model_name: str, namespace: str = "tandem_edge"
    ) -> None:
        self.registry = registry
        self.model_name = model_name
        ns, labels = namespace, ["model"]
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time to first token.",
            labels,
            namespace=ns,
            registry=registry,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            namespace=ns,
            registry=registry,
            buckets=ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            namespace=ns,
            registry=registry,
            buckets=E2E_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens processed.", labels, namespace=ns, registry=registry
        )
        self.generation_tokens = Counter(
            "generation_tokens", "Tokens generated.", labels, namespace=ns, registry=registry
        )
        self.requests = Counter(
            "requests",
            "Requests by finish reason and HTTP status.",
            [*labels, "finish_reason", "status"],
            namespace=ns,
            registry=registry,
        )
        self.exit_layer_tokens = Counter(
            "generated_tokens_by_exit_layer",
            "Generated tokens by the layer they exited at.",
            [*labels, "exit_layer"],
            namespace=ns,
            registry=registry,
        )
        self.source_tokens = Counter(
            "generated_tokens_by_source",
            "Generated tokens by who produced them (edge, cloud, fallback).",
            [*labels, "source"],
            namespace=ns,
            registry=registry,
        )
        self.model_layers = Gauge(
            "model_layers",
            "Number of layers of the served model (full depth).",
            labels,
            namespace=ns,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Requests waiting in the engine's admission queue.",
            labels,
            namespace=ns,
            registry=registry,
        )
        self.in_flight = Gauge(
            "requests_in_flight",
            "HTTP generation requests being served.",
            labels,
            namespace=ns,
            registry=registry,
        )

        # children of the per-token metrics, looked up once
        self._ttft_child = self.ttft.labels(model_name)
        self._itl_child = self.itl.labels(model_name)
        self._exit_children: dict[int, Any] = {}

    def _exit_layer_child(self, layer: int) -> Any:
        child = self._exit_children.get(layer)
        if child is None:
            child = self._exit_children[layer] = self.exit_layer_tokens.labels(
                self.model_name, str(layer)
            )
        return child

    def bind_engine(self, queue_depth: Callable[[], int], n_layers: int) -> None:
        """Read the queue depth from `queue_depth()` at every scrape."""

        def read() -> float:
            try:
                return float(queue_depth())
            except Exception:  # a scrape must not fail because the engine did
                return math.nan

        self.queue_depth.labels(self.model_name).set_function(read)
        self.model_layers.labels(self.model_name).set(n_layers)

    def start_request(self) -> RequestRecorder:
        return RequestRecorder(self)

    def record_rejected(self, status: int) -> None:
        """A request that failed before generation started (validation, 404, 429, ...)."""
        self.requests.labels(self.model_name, "none", str(status)).inc()


class RequestRecorder:
    """Timings and counts of one request; call `on_tokens` per chunk, `finish` once."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self._m = metrics
        self._model = metrics.model_name
        self.arrival = time.perf_counter()
        self._last_token: float | None = None
        self._finished = False
        metrics.in_flight.labels(self._model).inc()

    def on_tokens(
        self,
        exit_layers: Sequence[int],
        n_tokens: int | None = None,
        sources: Sequence[str] = (),
    ) -> None:
        """Record a chunk of `n_tokens` new tokens (default: len(exit_layers)).

        A chunk with k tokens observes its gap to the previous chunk as k inter-token
        latencies of gap/k, so the ITL sum equals the decode time.
        """
        n = len(exit_layers) if n_tokens is None else n_tokens
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last_token is None:
            self._m._ttft_child.observe(now - self.arrival)
            n_gaps = n - 1
            gap = 0.0
        else:
            n_gaps = n
            gap = (now - self._last_token) / n
        for _ in range(n_gaps):
            self._m._itl_child.observe(gap)
        self._last_token = now
        for layer in exit_layers:
            self._m._exit_layer_child(layer).inc()
        for source in sources:
            self._m.source_tokens.labels(self._model, source).inc()

    def finish(
        self, *, finish_reason: str, status: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        if self._finished:
            return
        self._finished = True
        m, model = self._m, self._model
        m.in_flight.labels(model).dec()
        m.e2e.labels(model).observe(time.perf_counter() - self.arrival)
        m.prompt_tokens.labels(model).inc(max(0, prompt_tokens))
        m.generation_tokens.labels(model).inc(max(0, completion_tokens))
        m.requests.labels(model, finish_reason, str(status)).inc()
