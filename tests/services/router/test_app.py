"""The router's front door, end to end: real gRPC edge nodes (fake engines) on 127.0.0.1,
a real uvicorn router, and the official `openai` client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import openai
import pytest

from services.edge_node.grpc_server import RunningGrpcServer, start_grpc_server
from services.router.app import build_router_app
from services.router.expert_engine import ExpertEngine
from services.router.experts import ExpertConfig
from services.router.predictor import Predictor
from services.router.profiles import CPU, ExpertSpec
from services.router.replicas import EdgeProber, HealthMonitor, ReplicaTable
from services.router.telemetry import LatencyTelemetry
from tandem.launch import free_port
from tests.api.fakes import DEFAULT_REPLY, FakeEngine
from tests.api.live_server import live_server

T = TypeVar("T")
EXPERT = "smollm2"


class EdgeLoop:
    """An event loop in a thread that hosts the gRPC edge servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, port: int = 0) -> RunningGrpcServer:
        async def start() -> RunningGrpcServer:
            return await start_grpc_server(FakeEngine(max_context=512), "127.0.0.1", port)

        return self.run(start())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def edges() -> Iterator[EdgeLoop]:
    edge_loop = EdgeLoop()
    servers: list[RunningGrpcServer] = []
    original = edge_loop.serve

    def serve(port: int = 0) -> RunningGrpcServer:
        srv = original(port)
        servers.append(srv)
        return srv

    edge_loop.serve = serve  # type: ignore[method-assign]
    try:
        yield edge_loop
    finally:
        for srv in servers:
            edge_loop.run(srv.stop(grace=0))
        edge_loop.close()


def cpu_predictor(*experts: str) -> Predictor:
    """Cost profiles for test experts: this CPU, 10 ms per output token, 1 ms per prompt token."""
    specs = {
        e: ExpertSpec(e, CPU, decode_s_per_token=0.01, prefill_s_per_token=0.001) for e in experts
    }
    return Predictor(specs, LatencyTelemetry())


@contextmanager
def router(addresses: list[str], api_key: str | None = None) -> Iterator[str]:
    """A real uvicorn router (lifespan on, so the health monitor runs) in a thread."""
    table = ReplicaTable(
        [ExpertConfig(EXPERT, "edge", tuple(addresses), device="cpu")], failure_threshold=1
    )
    engine = ExpertEngine(EXPERT, table, max_context=512, n_layers=4)
    monitor = HealthMonitor(table, EdgeProber(timeout_s=0.5), interval_s=0.1, timeout_s=0.5)
    app = build_router_app(
        {EXPERT: engine}, table, cpu_predictor(EXPERT), api_key=api_key, monitor=monitor
    )
    with live_server(app, lifespan="on") as base:
        yield base


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def client(base: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=10)


def test_completions_through_the_router(edges: EdgeLoop) -> None:
    srv = edges.serve()
    with router([f"127.0.0.1:{srv.port}"]) as base:
        oc = client(base)
        raw = oc.chat.completions.with_raw_response.create(
            model=EXPERT, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-tandem-expert"] == EXPERT
        assert raw.headers["x-tandem-replica"] == f"127.0.0.1:{srv.port}"
        chat = raw.parse()
        assert chat.model == EXPERT
        assert chat.choices[0].message.content == DEFAULT_REPLY
        assert chat.usage is not None and chat.usage.completion_tokens > 0

        cmpl = oc.completions.create(model=EXPERT, prompt="once upon", max_tokens=3)
        assert cmpl.choices[0].text == "Hello there! The "
        assert cmpl.choices[0].finish_reason == "length"

        stream = oc.chat.completions.create(
            model=EXPERT, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == DEFAULT_REPLY

        with httpx.stream(
            "POST",
            f"{base}/v1/completions",
            json={"model": EXPERT, "prompt": "x", "stream": True, "max_tokens": 2},
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-tandem-expert"] == EXPERT
            body = resp.read().decode()
        assert body.rstrip().endswith("data: [DONE]")

        assert [m.id for m in oc.models.list()] == [EXPERT]
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200 and "tandem_router_smollm2" in metrics.text


def test_unknown_and_auto_models(edges: EdgeLoop) -> None:
    srv = edges.serve()
    with router([f"127.0.0.1:{srv.port}"]) as base:
        oc = client(base)
        with pytest.raises(openai.NotFoundError) as nf:
            oc.completions.create(model="nope", prompt="hi")
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            oc.completions.create(model="auto", prompt="hi")
        assert bad.value.code == "model_auto_not_supported"
        assert httpx.get(f"{base}/v1/models/nope").status_code == 404


def test_api_key(edges: EdgeLoop) -> None:
    srv = edges.serve()
    with router([f"127.0.0.1:{srv.port}"], api_key="s3cret") as base:
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert [m.id for m in client(base, "s3cret").models.list()] == [EXPERT]
        assert httpx.get(f"{base}/health").status_code == 200


def test_readiness_flips_once_a_replica_is_healthy(edges: EdgeLoop) -> None:
    port = free_port()
    with router([f"127.0.0.1:{port}"]) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        edges.serve(port)
        wait_for(lambda: httpx.get(f"{base}/ready").status_code == 200)
        assert httpx.get(f"{base}/ready").json()["healthy_experts"] == [EXPERT]


def test_failover_when_a_replica_stops(edges: EdgeLoop) -> None:
    a, b = edges.serve(), edges.serve()
    with router([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as base:
        oc = client(base)
        edges.run(a.stop(grace=0))
        replicas = set()
        for _ in range(4):
            raw = oc.completions.with_raw_response.create(model=EXPERT, prompt="hi", max_tokens=2)
            assert raw.parse().choices[0].text == "Hello there! "
            replicas.add(raw.headers["x-tandem-replica"])
        assert replicas == {f"127.0.0.1:{b.port}"}
        stream = oc.completions.create(model=EXPERT, prompt="hi", max_tokens=2, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello there! "
