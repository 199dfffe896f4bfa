"""The whole edge node on the smallest real model (smollm2, int8, trained exits), driven
over loopback HTTP by the official openai client (slow: loads a real model)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from services.edge_node.engine import EdgeEngine
from services.edge_node.grpc_server import start_grpc_server
from services.edge_node.main import EdgeSettings, build_engine
from services.edge_node.metrics import EdgeMetrics
from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.clients.edge import EdgeClient
from tandem.models.registry import ModelRegistry
from tests.api.live_server import live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Iterator[EdgeEngine]:
    settings = EdgeSettings(
        model="smollm2",
        quant="int8",
        tau=0.9,
        host="127.0.0.1",
        port=0,
        grpc_port=0,
        max_batch=4,
        max_context=1024,
        api_key=None,
        grpc_token=None,
        cache_dir=Path("model_cache"),
    )
    eng = build_engine(settings, ModelRegistry())
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def base_url(engine: EdgeEngine) -> Iterator[str]:
    metrics = EdgeMetrics(CollectorRegistry(), model_name="smollm2")
    app = build_app(engine, served_model_id="smollm2", limits=ApiLimits(), metrics=metrics)
    with live_server(app) as url:
        yield url


def test_chat_answers_and_reports_exits(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    resp = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    text = resp.choices[0].message.content
    assert "Paris" in text
    tandem = resp.usage.model_extra["tandem"]
    assert tandem["n_layers"] == 30
    assert 0.0 <= tandem["early_exit_fraction"] <= 1.0


def test_streaming_equals_non_streaming(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    kwargs = dict(model="smollm2", prompt="def add(a, b):", temperature=0, max_tokens=20)
    whole = client.completions.create(**kwargs).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(parts) == whole and len(parts) > 1


def test_concurrent_clients_get_their_own_answers(base_url: str) -> None:
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120
    )
    prompts = ["The capital of France is", "1, 2, 3, 4,", "import os\nimport"]

    async def one(p: str) -> str:
        r = await client.completions.create(model="smollm2", prompt=p, temperature=0, max_tokens=12)
        return r.choices[0].text

    async def main():
        async with client:  # closed on this loop, not garbage-collected on a dead one later
            alone = [await one(p) for p in prompts]
            together = await asyncio.gather(*[one(p) for p in prompts])
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone  # batching does not change greedy output


def test_metrics_exported(base_url: str) -> None:
    import httpx

    body = httpx.get(base_url + "/metrics", timeout=10).text
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "generated_tokens_by_exit_layer_total",
        "queue_depth",
    ):
        assert name in body


def test_grpc_generate_matches_http(engine: EdgeEngine, base_url: str) -> None:
    from tandem.runtime.sampling import SamplingParams

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    http_text = (
        client.completions.create(
            model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=10
        )
        .choices[0]
        .text
    )

    async def main() -> str:
        server = await start_grpc_server(engine, "127.0.0.1", 0)
        try:
            async with EdgeClient(f"127.0.0.1:{server.port}") as edge:
                params = SamplingParams(max_tokens=10, temperature=0.0)
                chunks = [
                    c
                    async for c in edge.generate(
                        prompt="The capital of France is", params=params, timeout=60
                    )
                ]
            return "".join(c.text for c in chunks)
        finally:
            await server.stop()

    assert asyncio.run(asyncio.wait_for(main(), 90)) == http_text
