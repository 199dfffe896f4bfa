"""The real router in front of real edge nodes (the two smallest models: smollm2 int4 and
gemma3 int8, each its own process with its own gRPC server), with the trained gate and its
real smollm2 features: named-expert and "auto" requests, streaming with the official `openai`
client, and an expert killed mid-generation being routed around within the budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.router.config import parse_router_config
from services.router.main import build
from tandem.launch import ServiceProcess, free_port
from tests.api.live_server import live_server

pytestmark = pytest.mark.slow

MODELS = ("smollm2", "gemma3")
PROMPT = "The capital of France is"
BUDGET = {"latency_ms": 600_000, "energy_j": 10_000}  # generous: both experts fit it alone


class Edge:
    def __init__(self, model: str, log_dir: Path) -> None:
        self.model = model
        self.http, self.grpc = free_port(), free_port()
        args = ["services.edge_node.main", "--model", model]
        args += ["--port", str(self.http), "--grpc-port", str(self.grpc)]
        self.proc = ServiceProcess.start(f"edge-{model}", args, log_dir, {"TANDEM_THREADS": "1"})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Edge], Any]]:
    log_dir = tmp_path_factory.mktemp("logs")
    edges = {m: Edge(m, log_dir) for m in MODELS}
    try:
        for e in edges.values():
            e.proc.wait_grpc(e.target)
        raw = {
            "health": {"interval_s": 0.3, "timeout_s": 1.0, "failure_threshold": 1},
            "gate": {
                "path": "artifacts/gate/gate.pt",
                "subset_losses": "artifacts/gate/subset_loss.json",
            },
            "experts": [
                {"id": m, "kind": "edge", "device": "jetson-agx-orin", "replicas": [e.target]}
                for m, e in edges.items()
            ],
        }
        app = build(parse_router_config(raw, {}))
        with live_server(app, lifespan="on", start_timeout=60) as base:
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/ready").json()["healthy_experts"] != list(MODELS):
                assert time.monotonic() < deadline, "experts never became healthy"
                time.sleep(0.2)
            yield base, edges, app
    finally:
        for e in edges.values():
            e.proc.stop()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)


def test_named_expert_through_the_router_equals_the_expert_directly(cluster) -> None:
    base, edges, _ = cluster
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    direct = httpx.post(f"http://127.0.0.1:{edges['smollm2'].http}/v1/completions", json=body)
    raw = client(base).completions.with_raw_response.create(**body)
    routed = raw.parse()
    assert routed.choices[0].text == direct.json()["choices"][0]["text"]
    assert routed.usage.completion_tokens == direct.json()["usage"]["completion_tokens"]
    assert raw.headers["x-tandem-expert"] == "smollm2"
    assert raw.headers["x-tandem-replica"] == edges["smollm2"].target
    assert float(raw.headers["x-tandem-energy-j"]) > 0


def test_auto_streams_with_the_openai_client(cluster) -> None:
    base, edges, _ = cluster
    oc = client(base)
    with oc.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=BUDGET,
    ) as raw:
        expert = raw.headers["x-tandem-expert"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    report = chunks[-1].usage.model_extra["tandem"]["router"]
    assert report["answered_by"] == expert in MODELS and report["budget_met"]
    assert report["latency_ms"] > 0 and report["energy_j"] > 0
    # The same request straight to that expert's own API gives the same greedy text.
    direct = httpx.post(
        f"http://127.0.0.1:{edges[expert].http}/v1/chat/completions",
        json={
            "model": expert,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    )
    assert text == direct.json()["choices"][0]["message"]["content"]


def test_expert_killed_mid_generation_is_routed_around_within_the_budget(cluster) -> None:
    base, edges, app = cluster
    oc = client(base)
    first = oc.completions.with_raw_response.create(
        model="auto", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=BUDGET
    )
    victim = first.headers["x-tandem-expert"]
    survivor = next(m for m in MODELS if m != victim)

    result: dict[str, object] = {}

    def long_request() -> None:
        try:
            result["resp"] = oc.completions.with_raw_response.create(
                model="auto",
                prompt=PROMPT,
                max_tokens=96,
                temperature=0,
                extra_body=BUDGET,
            )
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=long_request)
    thread.start()
    # Kill the expert while it generates this request: the router's call to it is in flight,
    # then give it a second to be well into its 96 tokens.
    table = app.state.router.table
    deadline = time.monotonic() + 60
    while table.statuses(victim)[0].in_flight == 0:
        assert time.monotonic() < deadline and thread.is_alive(), "request never started"
        time.sleep(0.01)
    time.sleep(1.0)
    assert thread.is_alive(), "the request finished before the kill; make it longer"
    edges[victim].proc.kill()
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    raw = result["resp"]
    report = raw.parse().usage.model_extra["tandem"]["router"]
    assert report["failed"] == [victim] and report["answered_by"] == survivor
    assert report["budget_met"] and raw.headers["x-tandem-expert"] == survivor
    # Later requests go to the survivor at once (the health monitor saw the death).
    for _ in range(3):
        later = oc.completions.with_raw_response.create(
            model="auto", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=BUDGET
        )
        assert later.headers["x-tandem-expert"] == survivor
