"""Expert config parsing, replica health, least-loaded choice, failover and readiness.

Real gRPC over 127.0.0.1 against edge nodes serving the fake engine (no models); the OpenAI
prober runs against an httpx MockTransport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc
import httpx
import pytest

from services.edge_node.grpc_server import RunningGrpcServer, start_grpc_server
from services.router.experts import ExpertConfig, ExpertConfigError, parse_experts
from services.router.reference import REFERENCE_TIMINGS
from services.router.replicas import (
    EDGE_CHANNEL_OPTIONS,
    EdgeProber,
    HealthMonitor,
    KindProber,
    NoHealthyReplica,
    OpenAIProber,
    Replica,
    ReplicaTable,
    default_prober,
)
from tandem.clients.edge import EdgeClient, EdgeInvalidRequest, EdgeRpcError
from tandem.runtime.engine_api import GenerationChunk
from tandem.runtime.sampling import SamplingParams
from tests.services.edge_node.grpc_fakes import FakeEngine

TIMEOUT = 10.0  # seconds per test, end to end
PARAMS = SamplingParams(max_tokens=3)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def edge_nodes(*engines: FakeEngine) -> AsyncIterator[list[RunningGrpcServer]]:
    servers = [await start_grpc_server(e, "127.0.0.1", 0) for e in engines]
    try:
        yield servers
    finally:
        for srv in servers:
            await srv.stop(grace=None)


def edge_expert(expert_id: str, *servers: RunningGrpcServer) -> ExpertConfig:
    return ExpertConfig(
        expert_id=expert_id,
        kind="edge",
        replicas=tuple(f"127.0.0.1:{s.port}" for s in servers),
        device="cpu",
    )


def generate_on(replica: Replica) -> Awaitable[list[GenerationChunk]]:
    async def go() -> list[GenerationChunk]:
        async with EdgeClient(replica.address, options=EDGE_CHANNEL_OPTIONS) as client:
            return [c async for c in client.generate(prompt="hi", params=PARAMS, timeout=5)]

    return go()


def table_of(*replica_counts: int, **kwargs: Any) -> ReplicaTable:
    experts = [
        ExpertConfig(f"e{i}", "edge", tuple(f"h{i}-{j}:1" for j in range(n)), "cpu")
        for i, n in enumerate(replica_counts)
    ]
    return ReplicaTable(experts, **kwargs)


# -- config ----------------------------------------------------------------------------------


def test_parse_experts_from_plain_dict() -> None:
    experts = parse_experts(
        {
            "experts": [
                {
                    "id": "smollm2",
                    "kind": "edge",
                    "device": "jetson-agx-orin",
                    "replicas": ["10.0.0.5:50051", "10.0.0.6:50051"],
                    "token": "s3cret",
                },
                {
                    "id": "qwen-coder",
                    "kind": "openai",
                    "device": "rtx-4090",
                    "replicas": "http://cloud:8000/v1/",
                    "model": "Qwen/Qwen2.5-Coder-1.5B",
                    "max_context": 32768,
                    "decode_ms_per_token": 20,
                    "prefill_ms_per_token": 2.5,
                },
            ]
        }
    )
    ref = REFERENCE_TIMINGS["smollm2"]  # a shipped model's timings default to the reference
    assert experts == (
        ExpertConfig(
            "smollm2",
            "edge",
            ("10.0.0.5:50051", "10.0.0.6:50051"),
            "jetson-agx-orin",
            "s3cret",
            decode_s_per_token=ref.decode_s_per_token,
            prefill_s_per_token=ref.prefill_s_per_token,
        ),
        ExpertConfig(
            "qwen-coder",
            "openai",
            ("http://cloud:8000/v1",),
            "rtx-4090",
            model="Qwen/Qwen2.5-Coder-1.5B",
            max_context=32768,
            decode_s_per_token=0.02,
            prefill_s_per_token=0.0025,
        ),
    )
    assert experts[0].upstream_model == "smollm2"
    assert experts[1].upstream_model == "Qwen/Qwen2.5-Coder-1.5B"


GOOD = {"id": "a", "kind": "edge", "device": "cpu", "replicas": ["127.0.0.1:1"]}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "'experts' must be a list"),
        ({"experts": []}, "'experts' is empty"),
        ({"experts": ["x"]}, r"experts\[0\]: must be a mapping"),
        ({"experts": [{"id": "a"}]}, r"experts\[0\] \('a'\): missing 'kind', 'device', 'replicas'"),
        (
            {"experts": [{**GOOD, "kind": "grpc"}]},
            "unknown kind 'grpc'; expected one of edge, openai",
        ),
        ({"experts": [{**GOOD, "device": "tpu"}]}, "unknown device profile 'tpu'; known: cpu"),
        ({"experts": [{**GOOD, "replicas": []}]}, "'replicas' must be a non-empty list"),
        ({"experts": [{**GOOD, "replicas": ["nohost"]}]}, "must be a host:port gRPC target"),
        (
            {"experts": [{**GOOD, "replicas": ["http://x:1"]}]},
            "must be a host:port gRPC target",
        ),
        (
            {"experts": [{**GOOD, "kind": "openai", "replicas": ["x:1"]}]},
            "must be a base URL starting with http",
        ),
        ({"experts": [{**GOOD, "replicas": ["h:1", "h:1"]}]}, "'h:1' is listed twice"),
        ({"experts": [{**GOOD, "tokn": "x"}]}, "unknown key"),
        ({"experts": [{**GOOD, "id": ""}]}, "'id' must be a non-empty string"),
        ({"experts": [GOOD, GOOD]}, "duplicate expert id 'a'"),
    ],
)
def test_config_errors_are_clear(config: Any, message: str) -> None:
    with pytest.raises(ExpertConfigError, match=message):
        parse_experts(config)


# -- health ----------------------------------------------------------------------------------


def test_health_marks_stopped_node_unhealthy_and_restarted_node_healthy() -> None:
    async def body() -> None:
        engine = FakeEngine(depth=2)
        async with edge_nodes(engine, FakeEngine()) as (a, b):
            table = ReplicaTable([edge_expert("smollm2", a, b)], failure_threshold=2)
            ra, rb = table.replicas("smollm2")
            assert not table.ready(1)  # unknown until the first probe
            monitor = HealthMonitor(table, default_prober(timeout_s=0.5), interval_s=0.05)
            async with monitor:
                status = table.status(ra)  # start() ran one full round
                assert status.healthy and status.queue_depth == 2
                assert status.latency_ewma_s is not None and status.latency_ewma_s > 0
                assert table.ready(1)

                port = a.port
                await a.stop(grace=None)
                await eventually(lambda: not table.status(ra).healthy)
                assert table.status(ra).consecutive_failures >= 2
                assert "probe failed" in (table.status(ra).last_error or "")
                assert table.status(rb).healthy
                assert table.pick("smollm2") == rb

                restarted = await start_grpc_server(FakeEngine(), "127.0.0.1", port)
                try:
                    await eventually(lambda: table.status(ra).healthy)
                    assert table.status(ra).consecutive_failures == 0
                    assert table.status(ra).queue_depth == 0
                finally:
                    await restarted.stop(grace=None)

    run(body())


def test_not_serving_node_is_unhealthy_at_once() -> None:
    async def body() -> None:
        async with edge_nodes(FakeEngine()) as (a,):
            table = ReplicaTable([edge_expert("x", a)], failure_threshold=5)
            monitor = HealthMonitor(table, EdgeProber(timeout_s=0.5), interval_s=10)
            await monitor.check_once()
            (ra,) = table.replicas("x")
            assert table.status(ra).healthy
            a.servicer.set_serving(False)
            await monitor.check_once()
            assert not table.status(ra).healthy
            await monitor.stop()

    run(body())


def test_openai_prober_gets_models_with_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "down":
            return httpx.Response(503)
        return httpx.Response(200, json={"object": "list", "data": []})

    async def body() -> None:
        experts = [
            ExpertConfig("up", "openai", ("http://up:8000/v1",), "rtx-4090", token="tok"),
            ExpertConfig("down", "openai", ("http://down:8000/v1",), "rtx-4090"),
        ]
        table = ReplicaTable(experts, failure_threshold=1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            prober = KindProber({"openai": OpenAIProber(client=http)})
            await HealthMonitor(table, prober, interval_s=1).check_once()
        assert table.healthy_experts() == ("up",)
        up = next(r for r in seen if r.url.host == "up")
        assert str(up.url) == "http://up:8000/v1/models"
        assert up.headers["authorization"] == "Bearer tok"

    run(body())


# -- choice ----------------------------------------------------------------------------------


def test_pick_least_loaded_healthy_replica() -> None:
    table = table_of(3)
    r0, r1, r2 = table.replicas("e0")
    with pytest.raises(NoHealthyReplica, match="no healthy replica of expert 'e0'"):
        table.pick("e0")
    for r, depth, latency in ((r0, 3, 0.01), (r1, 1, 0.05), (r2, 1, 0.02)):
        table.record_success(r, queue_depth=depth, latency_s=latency)
    assert table.pick("e0") == r2  # depth 1, lower latency than r1
    with table.in_flight(r2):
        assert table.status(r2).in_flight == 1
        assert table.pick("e0") == r1  # same depth, fewer in flight
        with table.in_flight(r1), table.in_flight(r1):
            assert table.pick("e0") == r2
    assert table.status(r1).in_flight == 0
    assert table.pick("e0", exclude=[r2]) == r1
    assert table.pick("e0", exclude=[r1, r2]) == r0
    with pytest.raises(NoHealthyReplica, match="3 excluded"):
        table.pick("e0", exclude=[r0, r1, r2])
    with pytest.raises(KeyError, match="unknown expert 'nope'"):
        table.pick("nope")


def test_failures_mark_unhealthy_after_threshold_and_success_recovers() -> None:
    table = table_of(1, failure_threshold=2, ewma_alpha=0.5)
    (r,) = table.replicas("e0")
    table.record_success(r, latency_s=1.0)
    table.record_success(r, latency_s=3.0)
    assert table.status(r).latency_ewma_s == pytest.approx(2.0)
    table.record_failure(r, "boom")
    assert table.status(r).healthy
    table.record_failure(r, "boom")
    assert not table.status(r).healthy
    table.record_success(r)
    assert table.status(r).healthy and table.status(r).consecutive_failures == 0


def test_pick_prefers_shallower_queue_reported_by_real_nodes() -> None:
    async def body() -> None:
        async with edge_nodes(FakeEngine(depth=4), FakeEngine(depth=1)) as (a, b):
            table = ReplicaTable([edge_expert("x", a, b)])
            async with HealthMonitor(table, EdgeProber(), interval_s=10):
                assert table.pick("x").address == f"127.0.0.1:{b.port}"

    run(body())


def test_readiness_counts_experts_with_a_healthy_replica() -> None:
    table = table_of(2, 1, 1)
    assert table.ready(0) and not table.ready(1)
    table.record_success(table.replicas("e0")[1])
    assert table.ready(1) and not table.ready(2)
    table.record_success(table.replicas("e2")[0])
    assert table.healthy_experts() == ("e0", "e2")
    assert table.ready(2) and not table.ready(3)


# -- failover --------------------------------------------------------------------------------


def test_failover_to_second_replica_when_first_is_down() -> None:
    async def body() -> None:
        async with edge_nodes(FakeEngine(), FakeEngine(depth=1)) as (a, b):
            table = ReplicaTable([edge_expert("x", a, b)], failure_threshold=1)
            ra, rb = table.replicas("x")
            await HealthMonitor(table, EdgeProber(), interval_s=10).check_once()
            assert table.pick("x") == ra  # depth 0 beats depth 1
            await a.stop(grace=None)  # down, but the table has not noticed yet

            used: list[Replica] = []

            async def fn(replica: Replica) -> list[GenerationChunk]:
                used.append(replica)
                return await generate_on(replica)

            chunks = await table.call_with_failover("x", fn, attempts=2)
            assert "".join(c.text for c in chunks) == "word0 word1 word2 "
            assert used == [ra, rb]
            assert not table.status(ra).healthy  # the failed call counted against it
            assert "UNAVAILABLE" in (table.status(ra).last_error or "")
            assert table.status(rb).in_flight == 0

            # Only rb is left: a second failure ends in NoHealthyReplica, chained to it.
            await b.stop(grace=None)
            with pytest.raises(NoHealthyReplica) as info:
                await table.call_with_failover("x", generate_on, attempts=3)
            assert isinstance(info.value.__cause__, EdgeRpcError)

    run(body())


def test_failover_gives_up_after_attempts_and_skips_non_retryable_errors() -> None:
    async def body() -> None:
        table = table_of(3, failure_threshold=5)
        for r in table.replicas("e0"):
            table.record_success(r)
        calls: list[Replica] = []

        async def refused(replica: Replica) -> None:
            calls.append(replica)
            raise ConnectionRefusedError("refused")

        with pytest.raises(ConnectionRefusedError):
            await table.call_with_failover("e0", refused, attempts=2)
        assert len(set(calls)) == 2

        calls.clear()

        async def invalid(replica: Replica) -> None:
            calls.append(replica)
            raise EdgeInvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, "bad")

        with pytest.raises(EdgeInvalidRequest):
            await table.call_with_failover("e0", invalid, attempts=3)
        assert len(calls) == 1  # a bad request is bad everywhere: no failover

    run(body())


def test_stream_fails_over_only_before_the_first_chunk() -> None:
    async def body() -> None:
        async with edge_nodes(FakeEngine(), FakeEngine(depth=1)) as (a, b):
            table = ReplicaTable([edge_expert("x", a, b)], failure_threshold=1)
            ra, rb = table.replicas("x")
            await HealthMonitor(table, EdgeProber(), interval_s=10).check_once()
            await a.stop(grace=None)

            async def open_stream(replica: Replica) -> AsyncIterator[GenerationChunk]:
                async with EdgeClient(replica.address) as client:
                    async for c in client.generate(prompt="hi", params=PARAMS, timeout=5):
                        assert table.status(replica).in_flight == 1
                        yield c

            stream = table.stream_with_failover("x", open_stream, attempts=2)
            async with contextlib.aclosing(stream):
                texts = [c.text async for c in stream]
            assert "".join(texts) == "word0 word1 word2 "
            assert not table.status(ra).healthy and table.status(rb).in_flight == 0

        # After the first chunk a failure propagates: output already sent can't be retried.
        table = table_of(2)
        for r in table.replicas("e0"):
            table.record_success(r)
        opened: list[Replica] = []

        async def breaks_midway(replica: Replica) -> AsyncIterator[str]:
            opened.append(replica)
            yield "first"
            raise ConnectionResetError("reset")

        got: list[str] = []
        with pytest.raises(ConnectionResetError):
            async with contextlib.aclosing(
                table.stream_with_failover("e0", breaks_midway)
            ) as stream2:
                async for item in stream2:
                    got.append(item)
        assert got == ["first"] and len(opened) == 1

    run(body())
