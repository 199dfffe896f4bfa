"""Replica choice and health: the step after the router has chosen an expert.

- `ReplicaTable` keeps per-replica state (healthy, queue depth, consecutive failures, latency
  EWMA, the router's own in-flight count), picks the least-loaded healthy replica of an expert,
  and fails over to another replica when a call could not be served.
- `HealthMonitor` polls every replica every `interval_s` through a `Prober`: `EdgeProber`
  (tandem.edge.v1 Health over gRPC) for edge experts, `OpenAIProber` (GET {base}/models over
  HTTP) for OpenAI-compatible upstreams.

Health rules: a replica starts unhealthy (unknown) and turns healthy on its first successful
probe; `failure_threshold` consecutive failures (probe errors, or calls that failed with a
connection/unavailable error) mark it unhealthy; any success marks it healthy again. A node
that answers NOT_SERVING (draining) is unhealthy at once. The latency EWMA is the probe round
trip (a link/load signal for tie-breaking, not a generation-latency prediction).

Failover (`call_with_failover`, `stream_with_failover`) retries on another replica only when
the failure is retryable elsewhere (connection refused/reset, UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, HTTP 429/502/503/504) and happened BEFORE any output was produced. Output
already streamed to a client cannot be taken back, so a stream that fails after its first
chunk is never retried: the error propagates to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import httpx

from services.router.experts import ExpertConfig, ExpertKind
from tandem.clients.edge import EdgeClient, EdgeRpcError
from tandem.transport.grpc_tls import TlsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Short reconnect backoff so a restarted edge node is seen on the next probe, not minutes later.
EDGE_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # No BDP ping after received data: answers are small, and a ping is one more wake-up
    # on both sides per call.
    ("grpc.http2.bdp_probe", 0),
)

_RETRY_HTTP_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Replica:
    """One address serving one expert (what a failover callback receives)."""

    expert_id: str
    kind: ExpertKind
    address: str
    token: str | None = field(default=None, repr=False)  # never in logs


@dataclass(frozen=True)
class ReplicaStatus:
    """A snapshot of one replica's state."""

    replica: Replica
    healthy: bool
    queue_depth: int
    in_flight: int
    consecutive_failures: int
    latency_ewma_s: float | None
    last_error: str | None


@dataclass(frozen=True)
class Probe:
    """One health probe's answer: is the replica serving, and its reported queue depth."""

    serving: bool
    queue_depth: int = 0


class NoHealthyReplica(LookupError):
    """No healthy replica of the expert is left to try."""

    def __init__(self, expert_id: str, detail: str = "") -> None:
        message = f"no healthy replica of expert {expert_id!r}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.expert_id = expert_id


def is_retryable_elsewhere(exc: BaseException) -> bool:
    """The replica could not serve the request, but another replica may."""
    if isinstance(exc, EdgeRpcError):
        return exc.retryable_elsewhere
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in _RETRY_HTTP_STATUS
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


def _counts_against_health(exc: BaseException) -> bool:
    """Overloaded (RESOURCE_EXHAUSTED / 429) is a live node saying no: not a health failure."""
    if isinstance(exc, EdgeRpcError):
        return exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code != 429
    return True


class _State:
    __slots__ = (
        "replica",
        "healthy",
        "queue_depth",
        "in_flight",
        "consecutive_failures",
        "latency_ewma_s",
        "last_error",
    )

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.healthy = False
        self.queue_depth = 0
        self.in_flight = 0
        self.consecutive_failures = 0
        self.latency_ewma_s: float | None = None
        self.last_error: str | None = None

    def snapshot(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica=self.replica,
            healthy=self.healthy,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            consecutive_failures=self.consecutive_failures,
            latency_ewma_s=self.latency_ewma_s,
            last_error=self.last_error,
        )


class ReplicaTable:
    """Per-replica state for the configured experts; single event loop, no locking needed."""

    def __init__(
        self,
        experts: Sequence[ExpertConfig],
        *,
        failure_threshold: int = 2,
        ewma_alpha: float = 0.3,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not 0 < ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        self.failure_threshold = failure_threshold
        self.ewma_alpha = ewma_alpha
        self._by_expert: dict[str, tuple[_State, ...]] = {}
        for expert in experts:
            if expert.expert_id in self._by_expert:
                raise ValueError(f"duplicate expert id {expert.expert_id!r}")
            self._by_expert[expert.expert_id] = tuple(
                _State(Replica(expert.expert_id, expert.kind, address, expert.token))
                for address in expert.replicas
            )

    # -- lookup ----------------------------------------------------------------------------

    @property
    def expert_ids(self) -> tuple[str, ...]:
        return tuple(self._by_expert)

    def replicas(self, expert_id: str | None = None) -> tuple[Replica, ...]:
        """The replicas of one expert, or of all experts."""
        states = self._states(expert_id) if expert_id is not None else self._all_states()
        return tuple(s.replica for s in states)

    def status(self, replica: Replica) -> ReplicaStatus:
        return self._state(replica).snapshot()

    def statuses(self, expert_id: str | None = None) -> tuple[ReplicaStatus, ...]:
        states = self._states(expert_id) if expert_id is not None else self._all_states()
        return tuple(s.snapshot() for s in states)

    def _states(self, expert_id: str) -> tuple[_State, ...]:
        try:
            return self._by_expert[expert_id]
        except KeyError:
            known = ", ".join(self._by_expert)
            raise KeyError(f"unknown expert {expert_id!r}; known: {known}") from None

    def _all_states(self) -> tuple[_State, ...]:
        return tuple(s for states in self._by_expert.values() for s in states)

    def _state(self, replica: Replica) -> _State:
        for state in self._states(replica.expert_id):
            if state.replica.address == replica.address:
                return state
        raise KeyError(f"unknown replica {replica.address!r} of expert {replica.expert_id!r}")

    # -- health bookkeeping ----------------------------------------------------------------

    def record_success(
        self, replica: Replica, *, queue_depth: int | None = None, latency_s: float | None = None
    ) -> None:
        state = self._state(replica)
        if not state.healthy:
            log.info("replica %s of %s is healthy", replica.address, replica.expert_id)
        state.healthy = True
        state.consecutive_failures = 0
        state.last_error = None
        if queue_depth is not None:
            state.queue_depth = queue_depth
        if latency_s is not None:
            prev = state.latency_ewma_s
            a = self.ewma_alpha
            state.latency_ewma_s = latency_s if prev is None else a * latency_s + (1 - a) * prev

    def record_failure(self, replica: Replica, error: str) -> None:
        state = self._state(replica)
        state.consecutive_failures += 1
        state.last_error = error
        if state.healthy and state.consecutive_failures >= self.failure_threshold:
            log.warning(
                "replica %s of %s is unhealthy: %s", replica.address, replica.expert_id, error
            )
            state.healthy = False

    def record_not_serving(self, replica: Replica, queue_depth: int = 0) -> None:
        """The replica answered but is not serving (draining): unhealthy at once."""
        state = self._state(replica)
        state.healthy = False
        state.queue_depth = queue_depth
        state.last_error = "not serving"

    # -- choice ----------------------------------------------------------------------------

    def pick(self, expert_id: str, exclude: Iterable[Replica] = ()) -> Replica:
        """The least-loaded healthy replica not in `exclude`: lowest reported queue depth, then
        fewest router in-flight requests, then lowest latency EWMA, then config order.
        Raises NoHealthyReplica (KeyError for an unknown expert)."""
        excluded = {r.address for r in exclude if r.expert_id == expert_id}
        candidates = [
            (s.queue_depth, s.in_flight, _ewma_key(s.latency_ewma_s), i, s)
            for i, s in enumerate(self._states(expert_id))
            if s.healthy and s.replica.address not in excluded
        ]
        if not candidates:
            detail = f"{len(excluded)} excluded" if excluded else ""
            raise NoHealthyReplica(expert_id, detail)
        return min(candidates, key=lambda c: c[:4])[4].replica

    @contextlib.contextmanager
    def in_flight(self, replica: Replica) -> Iterator[Replica]:
        """Count a request on `replica` for the duration of the block."""
        state = self._state(replica)
        state.in_flight += 1
        try:
            yield replica
        finally:
            state.in_flight -= 1

    def healthy_experts(self) -> tuple[str, ...]:
        return tuple(e for e, states in self._by_expert.items() if any(s.healthy for s in states))

    def ready(self, min_experts: int = 1) -> bool:
        """At least `min_experts` experts have a healthy replica."""
        return len(self.healthy_experts()) >= min_experts

    # -- failover --------------------------------------------------------------------------

    def _note_call_failure(self, replica: Replica, exc: BaseException) -> None:
        log.info(
            "call to %s of %s failed, trying another replica: %s",
            replica.address,
            replica.expert_id,
            exc,
        )
        if _counts_against_health(exc):
            self.record_failure(replica, f"{type(exc).__name__}: {exc}")

    def _next_untried(
        self, expert_id: str, tried: list[Replica], last: BaseException | None
    ) -> Replica:
        """The best healthy replica not tried yet (appended to `tried`); NoHealthyReplica,
        chained to the last call's error, when none is left."""
        try:
            replica = self.pick(expert_id, exclude=tried)
        except NoHealthyReplica as exc:
            raise exc from last
        tried.append(replica)
        return replica

    async def call_with_failover(
        self, expert_id: str, fn: Callable[[Replica], Awaitable[T]], attempts: int = 2
    ) -> T:
        """`await fn(replica)` on the best replica; on a retryable-elsewhere failure, try the
        next best one not yet tried, up to `attempts` replicas in all. `fn` must not have
        produced any output visible to the client when it fails (for streams, use
        `stream_with_failover`, which only retries before the first chunk). Other errors
        propagate at once. When replicas run out: the last retryable error if `attempts` were
        used, else NoHealthyReplica (chained to the last error, if any)."""
        _check_attempts(attempts)
        tried: list[Replica] = []
        last: BaseException | None = None
        for _ in range(attempts):
            replica = self._next_untried(expert_id, tried, last)
            with self.in_flight(replica):
                try:
                    return await fn(replica)
                except Exception as exc:
                    if not is_retryable_elsewhere(exc):
                        raise
                    self._note_call_failure(replica, exc)
                    last = exc
        assert last is not None
        raise last

    async def stream_with_failover(
        self,
        expert_id: str,
        open_stream: Callable[[Replica], AsyncIterator[T]],
        attempts: int = 2,
    ) -> AsyncIterator[T]:
        """Yield the items of `open_stream(replica)`, failing over (as `call_with_failover`)
        only while no item has been yielded yet. Once the first item is out, any error
        propagates: streamed output cannot be retried. The replica's in-flight count covers
        the whole stream. Use with `contextlib.aclosing`."""
        _check_attempts(attempts)
        tried: list[Replica] = []
        last: BaseException | None = None
        for _ in range(attempts):
            replica = self._next_untried(expert_id, tried, last)
            with self.in_flight(replica):
                stream = open_stream(replica)
                try:
                    try:
                        first = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        if not is_retryable_elsewhere(exc):
                            raise
                        self._note_call_failure(replica, exc)
                        last = exc
                        continue
                    yield first
                    async for item in stream:
                        yield item
                    return
                finally:
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()
        assert last is not None
        raise last


def _check_attempts(attempts: int) -> None:
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")


def _ewma_key(value: float | None) -> float:
    return float("inf") if value is None else value


# -- probes ------------------------------------------------------------------------------------


class Prober(Protocol):
    async def probe(self, replica: Replica) -> Probe:
        """Raise on failure (connection, timeout, bad status)."""
        ...

    async def close(self) -> None: ...


class EdgeProber:
    """Health of edge nodes through tandem.edge.v1 Health (one cached channel per address)."""

    def __init__(self, *, timeout_s: float = 1.0, tls: TlsConfig | None = None) -> None:
        self.timeout_s = timeout_s
        self.tls = tls
        self._clients: dict[str, EdgeClient] = {}

    async def probe(self, replica: Replica) -> Probe:
        client = self._clients.get(replica.address)
        if client is None:
            client = EdgeClient(
                replica.address, token=replica.token, options=EDGE_CHANNEL_OPTIONS, tls=self.tls
            )
            self._clients[replica.address] = client
        health = await client.health(timeout=self.timeout_s)
        return Probe(serving=health.serving, queue_depth=health.queue_depth)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


class OpenAIProber:
    """Health of OpenAI-compatible upstreams: GET {base}/models must answer 2xx (the queue
    depth is unknown and reported as 0). Pass `client` to share or fake the HTTP client."""

    def __init__(self, *, timeout_s: float = 1.0, client: httpx.AsyncClient | None = None) -> None:
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient()

    async def probe(self, replica: Replica) -> Probe:
        headers = {"authorization": f"Bearer {replica.token}"} if replica.token else {}
        response = await self._client.get(
            f"{replica.address}/models", headers=headers, timeout=self.timeout_s
        )
        response.raise_for_status()
        return Probe(serving=True, queue_depth=0)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class KindProber:
    """Dispatch each replica to the prober of its expert kind."""

    def __init__(self, probers: Mapping[str, Prober]) -> None:
        self._probers = dict(probers)

    async def probe(self, replica: Replica) -> Probe:
        try:
            prober = self._probers[replica.kind]
        except KeyError:
            raise ValueError(f"no prober for expert kind {replica.kind!r}") from None
        return await prober.probe(replica)

    async def close(self) -> None:
        for prober in self._probers.values():
            await prober.close()


def default_prober(*, timeout_s: float = 1.0, tls: TlsConfig | None = None) -> KindProber:
    """Edge replicas over gRPC Health (TLS with `tls`), openai replicas over GET /models."""
    return KindProber(
        {
            "edge": EdgeProber(timeout_s=timeout_s, tls=tls),
            "openai": OpenAIProber(timeout_s=timeout_s),
        }
    )


class HealthMonitor:
    """Probe every replica of `table` every `interval_s` seconds (all concurrently, each
    bounded by `timeout_s`) and record the outcome. `start()` runs one full check before it
    returns, so readiness is known at once; `stop()` cancels the loop and closes the prober.
    Also an async context manager."""

    def __init__(
        self,
        table: ReplicaTable,
        prober: Prober,
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        self.table = table
        self.prober = prober
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def check(self, replica: Replica) -> None:
        start = self._clock()
        try:
            async with asyncio.timeout(self.timeout_s):
                probe = await self.prober.probe(replica)
        except Exception as exc:  # any probe failure counts against the replica
            self.table.record_failure(replica, f"probe failed: {type(exc).__name__}: {exc}")
            return
        if probe.serving:
            self.table.record_success(
                replica, queue_depth=probe.queue_depth, latency_s=self._clock() - start
            )
        else:
            self.table.record_not_serving(replica, probe.queue_depth)

    async def check_once(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.table.replicas()))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # never let the monitor die silently
                log.exception("health check round failed")

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("health monitor already started")
        await self.check_once()
        self._task = asyncio.create_task(self._loop(), name="router-health-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.prober.close()

    async def __aenter__(self) -> HealthMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
