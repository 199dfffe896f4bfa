"""Collaborative mode end to end on the smallest real model (smollm2 split at its middle
exit, layer 15 of 30): the OpenAI API of an edge node whose engine runs layers [0, 15)
and a cloud context manager with layers [15, 30) over real gRPC on 127.0.0.1.

At tau = 1.0 every token goes to the cloud and the greedy output must be identical to the
full model's. At tau < 1 the response reports how many tokens the cloud produced; with the
cloud gone the node falls back to edge-standalone and says so (slow: loads a real model).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.metrics import EdgeMetrics
from services.edge_node.tau_policy import TauPolicy
from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.api.live_server import live_server
from tests.services.edge_node.cloud_server import cloud_manager, cloud_server

pytestmark = pytest.mark.slow
SPLIT = 15
PROMPT = "def fibonacci(n):"
N_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2():
    return load_model(
        ModelRegistry().get("smollm2"),
        LoadOptions(quant="bf16", exits=True, cache_dir=Path("model_cache")),
    )


def _serve(lm, target: str, tau: float, **link):
    cloud = CloudLink(CloudLinkConfig(target=target, **link))
    cloud.start()
    engine = EdgeEngine(
        "smollm2",
        lm.decoder(depth=SPLIT),
        lm.codec,
        EngineConfig(tau=tau),
        cloud=cloud,
        tau_policy=TauPolicy(tau, min(tau, 0.5)),
    )
    engine.start()
    metrics = EdgeMetrics(CollectorRegistry(), model_name="smollm2")
    metrics.bind_cloud_link(cloud, lambda: engine.tau_now)
    app = build_app(engine, served_model_id="smollm2", limits=ApiLimits(), metrics=metrics)
    return engine, cloud, app


def _complete(base: str) -> httpx.Response:
    body = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def test_tau_one_equals_the_full_model_and_reports_the_cloud(smollm2):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    expected = smollm2.codec.decode(
        generate(smollm2.decoder(), smollm2.codec.encode(PROMPT), params).token_ids
    )
    manager = cloud_manager(smollm2.model, SPLIT)
    with cloud_server(manager) as port:
        engine, cloud, app = _serve(smollm2, f"127.0.0.1:{port}", tau=1.0)
        try:
            with live_server(app) as base:
                resp = _complete(base)
                metrics = httpx.get(f"{base}/metrics").text
        finally:
            engine.stop()
            cloud.close()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == expected
    assert resp.headers["x-tandem-mode"] == "collaborative"
    tandem = body["usage"]["tandem"]
    assert tandem["cloud_tokens"] == N_TOKENS and tandem["fallback_tokens"] == 0
    assert f'tandem_edge_cloud_token_requests_total{{model="smollm2"}} {N_TOKENS}.0' in metrics
    assert 'source="cloud"' in metrics


def test_exits_cut_cloud_requests_and_a_dead_cloud_means_fallback(smollm2):
    manager = cloud_manager(smollm2.model, SPLIT)
    with cloud_server(manager) as port:
        engine, cloud, app = _serve(smollm2, f"127.0.0.1:{port}", tau=0.6)
        try:
            with live_server(app) as base:
                collab = _complete(base)
        finally:
            engine.stop()
            cloud.close()
    tandem = collab.json()["usage"]["tandem"]
    assert tandem["mode"] == "collaborative"
    assert 0 < tandem["cloud_tokens"] < N_TOKENS  # some tokens exited on the edge

    engine, cloud, app = _serve(smollm2, f"127.0.0.1:{port}", tau=0.6, timeout_s=1.0)
    try:
        with live_server(app) as base:
            alone = _complete(base)
    finally:
        engine.stop()
        cloud.close()
    assert alone.status_code == 200
    assert alone.headers["x-tandem-mode"] == "fallback"
    tandem = alone.json()["usage"]["tandem"]
    assert tandem["cloud_tokens"] == 0 and tandem["fallback_tokens"] > 0
