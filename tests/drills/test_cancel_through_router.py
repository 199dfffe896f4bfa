"""Cancellation through the router, end to end: a client that disconnects mid-stream stops the
generation on the edge and frees the session's KV in cloud_ctx and in the attention pool.

Real processes: an attention pool (1 worker, smollm2's cloud-layer shape), cloud_ctx in
offload mode (smollm2 layers [15, 30), no KV of its own), a collaborative smollm2 edge node
(layers [0, 15), tau 1: every token is asked of the cloud), and the router in-process."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from services.router.config import parse_router_config
from services.router.main import build
from tandem.launch import ServiceProcess, free_port
from tests.api.live_server import live_server

pytestmark = pytest.mark.slow
SPLIT = 15


def metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in {url}"
    return float(m.group(1))


def eventually(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_client_disconnect_stops_the_edge_and_frees_cloud_and_pool_kv(tmp_path) -> None:
    pool_port, pool_metrics = free_port(), free_port()
    cloud_port, cloud_metrics = free_port(), free_port()
    edge_http, edge_grpc = free_port(), free_port()
    env = {"TANDEM_THREADS": "1"}
    procs: list[ServiceProcess] = []
    try:
        pool = ServiceProcess.start(
            "pool",
            ["services.attention_pool.main", "--model", "smollm2", "--workers", "1"]
            + ["--first-layer", str(SPLIT), "--port", str(pool_port)]
            + ["--metrics-port", str(pool_metrics), "--capacity-mb", "256"],
            tmp_path,
            env,
        )
        procs.append(pool)
        pool.wait_grpc(f"127.0.0.1:{pool_port}")
        cloud = ServiceProcess.start(
            "cloud",
            ["services.cloud_ctx.main", "--model", "smollm2", "--split", str(SPLIT)]
            + ["--grpc-port", str(cloud_port), "--metrics-port", str(cloud_metrics)]
            + ["--no-redis", "--attention-pool", f"127.0.0.1:{pool_port}"],
            tmp_path,
            env,
        )
        procs.append(cloud)
        cloud.wait_grpc(f"127.0.0.1:{cloud_port}")
        edge = ServiceProcess.start(
            "edge",
            ["services.edge_node.main", "--model", "smollm2", "--split", str(SPLIT)]
            + ["--cloud", f"127.0.0.1:{cloud_port}", "--tau", "1.0", "--cloud-timeout", "30"]
            + ["--port", str(edge_http), "--grpc-port", str(edge_grpc)],
            tmp_path,
            env,
        )
        procs.append(edge)
        edge.wait_grpc(f"127.0.0.1:{edge_grpc}")
        raw = {
            "health": {"interval_s": 0.3, "timeout_s": 1.0},
            "gate": None,
            "experts": [
                {
                    "id": "smollm2",
                    "kind": "edge",
                    "device": "cpu",
                    "replicas": [f"127.0.0.1:{edge_grpc}"],
                }
            ],
        }
        cloud_m = f"http://127.0.0.1:{cloud_metrics}/metrics"
        pool_m = f"http://127.0.0.1:{pool_metrics}/metrics"
        with live_server(build(parse_router_config(raw, {})), lifespan="on") as base:
            eventually(lambda: httpx.get(f"{base}/ready").status_code == 200)
            body = {
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
                "max_tokens": 400,
                "stream": True,
            }
            with httpx.Client(timeout=120) as c:
                with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    seen = 0
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"content"' in line:
                            seen += 1
                        if seen >= 4:
                            break  # a few tokens in: the client hangs up
            # the edge aborts at its next step and releases the cloud session, which frees it
            # in the pool too
            eventually(lambda: metric(cloud_m, "tandem_cloud_sessions") == 0)
            eventually(lambda: metric(pool_m, "tandem_attn_sessions") == 0)
            assert metric(pool_m, "tandem_attn_kv_bytes") == 0
            tokens = metric(cloud_m, "tandem_cloud_tokens_total")
            time.sleep(1.0)
            assert metric(cloud_m, "tandem_cloud_tokens_total") == tokens  # generation stopped
            assert 3 <= tokens < 100, f"{tokens} cloud tokens: the chain did not run, or kept on"
    finally:
        for p in reversed(procs):
            p.stop()
