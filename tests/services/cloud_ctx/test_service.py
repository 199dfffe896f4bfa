"""The cloud service as `main.serve` wires it (tiny model, real Redis, real gRPC + HTTP):
a restarted replica continues a session from the log with the same tokens, /metrics and
/health answer, settings and the Redis check at startup behave."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import grpc
import pytest
import torch

from services.cloud_ctx.main import CloudEndpoints, connect_redis, parse_settings, serve
from services.cloud_ctx.weights import drop_lower_layers, tensor_bytes
from tandem.models.registry import ModelRegistry
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tandem.transport.cloud_wire import hidden_to_proto
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.services.cloud_ctx.tiny_cloud import REGISTRY, SPLIT, TINY, tiny_upper_half
from tests.tiny import tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _settings(redis_url: str | None, prefix: str, replica: str):
    args = ["--grpc-port", "0", "--metrics-port", "0", "--replica-id", replica]
    args += ["--redis-url", redis_url, "--redis-prefix", prefix] if redis_url else ["--no-redis"]
    return parse_settings(REGISTRY, ["--model", TINY.id, *args])


async def _replica(settings, client, body):
    """Serve one replica while `body(endpoints)` runs, then stop it gracefully."""
    stop = asyncio.Event()
    ready: asyncio.Future[CloudEndpoints] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, tiny_upper_half(), client, stop, ready.set_result))
    try:
        endpoints = await asyncio.wait_for(asyncio.shield(ready), 30)
        return await body(endpoints)
    finally:
        stop.set()
        await task


def test_restarted_replica_continues_from_the_log(redis_client, redis_url, redis_prefix):
    model = tiny_model("llama")
    expected = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    edge = EdgeHalf(model, SPLIT)
    out: list[int] = []
    state = {"pos": len(PROMPT) - 1, "hidden": None}

    async def tokens(stub, n: int) -> None:
        for _ in range(n):
            reply = await stub.NextToken(
                cloud_pb2.TokenRequest(
                    session_id="s", position=state["pos"], hidden=hidden_to_proto(state["hidden"])
                )
            )
            out.append(reply.token_id)
            state["pos"] += 1
            state["hidden"] = edge.hidden([reply.token_id])

    async def first(ep: CloudEndpoints):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.grpc_port}") as ch:
            stub = cloud_pb2_grpc.CloudContextStub(ch)
            h = edge.hidden(PROMPT)
            req = cloud_pb2.UploadRequest(
                session_id="s", start_pos=0, hidden=hidden_to_proto(h[:-1])
            )
            assert (await stub.Upload(iter([req]))).positions == len(PROMPT) - 1
            state["hidden"] = h[-1:]
            await tokens(stub, 3)

    async def second(ep: CloudEndpoints):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.grpc_port}") as ch:
            stub = cloud_pb2_grpc.CloudContextStub(ch)
            await tokens(stub, GREEDY.max_tokens - 3)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.NextToken(cloud_pb2.TokenRequest(session_id="nobody", position=0))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        status, text = await asyncio.to_thread(_get, ep.metrics_port, "/metrics")
        health = await asyncio.to_thread(_get, ep.metrics_port, "/health")
        return status, text, health

    async def main():
        await _replica(_settings(redis_url, redis_prefix, "a"), redis_client, first)
        return await _replica(_settings(redis_url, redis_prefix, "b"), redis_client, second)

    status, text, (health_status, health_body) = asyncio.run(main())
    assert out == expected

    assert status == 200
    ns = "tandem_cloud"
    assert _metric(text, f"{ns}_rebuilds_total") == 1
    assert _metric(text, f"{ns}_tokens_total") == GREEDY.max_tokens - 3
    assert _metric(text, f"{ns}_sessions") == 1
    assert _metric(text, f"{ns}_session_bytes") > 0
    assert _metric(text, f"{ns}_catch_up_rows_count") == GREEDY.max_tokens - 3
    # the first request after the restart caught up on everything logged
    assert _metric(text, f"{ns}_catch_up_rows_sum") == len(PROMPT) + 3 + (GREEDY.max_tokens - 4)
    bytes_per_row = 2 * model.cfg.hidden_size
    assert _metric(text, f"{ns}_uploaded_bytes_total") == bytes_per_row * (GREEDY.max_tokens - 3)
    assert _metric(text, f"{ns}_uploaded_positions_total") == GREEDY.max_tokens - 3
    assert 'code="NOT_FOUND"' in text and 'rpc="NextToken"' in text
    assert f"{ns}_evictions_total" in text and f"{ns}_request_compute_seconds_bucket" in text

    assert health_status == 200
    health = json.loads(health_body)
    assert health["status"] == "ok" and health["redis"] == "ok" and health["replica"] == "b"
    assert health["split"] == SPLIT


def test_health_without_redis_and_unknown_paths():
    async def body(ep: CloudEndpoints):
        return (
            await asyncio.to_thread(_get, ep.metrics_port, "/health"),
            await asyncio.to_thread(_get, ep.metrics_port, "/nope"),
        )

    (status, text), (missing, _) = asyncio.run(_replica(_settings(None, "", "solo"), None, body))
    assert status == 200 and json.loads(text)["redis"] == "off"
    assert missing == 404


def test_settings_defaults_and_errors(monkeypatch):
    for var in ("TANDEM_CLOUD_MODEL", "TANDEM_REDIS_URL", "CLOUD_GRPC_PORT", "TANDEM_NO_REDIS"):
        monkeypatch.delenv(var, raising=False)
    s = parse_settings(ModelRegistry(), [])
    assert (s.model, s.split, s.quant, s.host) == ("qwen15", None, "bf16", "127.0.0.1")
    assert (s.grpc_port, s.metrics_port) == (50061, 9461)
    assert s.redis_url == "redis://127.0.0.1:6379/0" and s.redis_prefix is None
    monkeypatch.setenv("CLOUD_GRPC_PORT", "6000")
    monkeypatch.setenv("TANDEM_NO_REDIS", "1")
    s = parse_settings(ModelRegistry(), ["--model", "smollm2", "--split", "15", "--quant", "int8"])
    assert (s.grpc_port, s.redis_url, s.split, s.quant) == (6000, None, 15, "int8")
    with pytest.raises(SystemExit):
        parse_settings(ModelRegistry(), ["--model", "nope"])
    with pytest.raises(SystemExit) as exc:
        connect_redis("redis://127.0.0.1:1/0")
    assert "--no-redis" in str(exc.value.code)


def test_dropping_lower_layers_keeps_tokens_and_a_tied_lm_head():
    model = tiny_model("llama")  # tied: lm_head shares the embedding matrix
    expected = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    edge = EdgeHalf(tiny_model("llama"), SPLIT)
    full = tensor_bytes(model)
    drop_lower_layers(model, SPLIT)
    assert tensor_bytes(model) < full and model.dtype == torch.float32
    kv = model.new_kv(first_layer=SPLIT)
    out, ids, start = [], PROMPT, 0
    while len(out) < GREEDY.max_tokens:
        h = edge.hidden(ids)
        top = model.run_sequence(h, kv, start, SPLIT, model.cfg.n_layers)
        start += len(ids)
        out.append(int(model.logits(top[-1:])[0].argmax()))
        ids = [out[-1]]
    assert out == expected
