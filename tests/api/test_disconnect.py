"""A client that leaves must close the engine iterator (abort), streaming or not.

The app is driven as a raw ASGI callable: `receive` hands over the body, then reports
`http.disconnect` once the fake engine is blocked mid-generation.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tests.api.fakes import FakeEngine

pytestmark = pytest.mark.anyio

MODEL = "fake-model"


def _scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 12345),
        "server": ("test", 80),
    }


async def _drive(path: str, payload: dict[str, Any], engine: FakeEngine) -> list[dict[str, Any]]:
    metrics = ApiMetrics(CollectorRegistry(), model_name=MODEL)
    app = build_app(engine, served_model_id=MODEL, limits=ApiLimits(), metrics=metrics)
    body = json.dumps(payload).encode()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await engine.blocked.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(_scope(path, body), receive, send)
    assert (
        metrics.registry.get_sample_value("tandem_edge_requests_in_flight", {"model": MODEL}) == 0
    )
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_non_streaming_disconnect_aborts(path: str) -> None:
    engine = FakeEngine(block_after=2)
    payload: dict[str, Any] = {"model": MODEL, "max_tokens": 20}
    payload |= (
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    )
    await _drive(path, payload, engine)
    assert [r.request_id for r in engine.requests] == engine.aborted
    assert len(engine.aborted) == 1 and engine.finished == []


async def test_streaming_disconnect_aborts_after_some_chunks() -> None:
    engine = FakeEngine(block_after=3)
    payload = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    sent = await _drive("/v1/chat/completions", payload, engine)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    data = b"".join(m.get("body", b"") for m in sent[1:])
    assert data.count(b"data: ") == 4  # role chunk + 3 content chunks, then the client left
    assert len(engine.aborted) == 1 and engine.finished == []


async def test_streaming_disconnect_before_first_token_aborts() -> None:
    engine = FakeEngine(block_after=0)
    payload = {"model": MODEL, "stream": True, "prompt": "hi"}
    sent = await _drive("/v1/completions", payload, engine)
    assert len(engine.aborted) == 1 and engine.finished == []
    assert all(b"data:" not in m.get("body", b"") for m in sent)
