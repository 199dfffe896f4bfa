"""The OpenAI-compatible HTTP API, driven in-process through httpx's ASGI transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tests.api.fakes import DEFAULT_REPLY, FakeEngine

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
TIMEOUT_S = 10
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def make_app(
    engine: FakeEngine | None = None,
    *,
    api_key: str | None = None,
    limits: ApiLimits | None = None,
) -> tuple[Any, FakeEngine, ApiMetrics]:
    engine = engine or FakeEngine()
    metrics = ApiMetrics(CollectorRegistry(), model_name=MODEL)
    app = build_app(
        engine,
        served_model_id=MODEL,
        limits=limits or ApiLimits(),
        metrics=metrics,
        api_key=api_key,
    )
    return app, engine, metrics


@asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    with anyio.fail_after(TIMEOUT_S):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into JSON payloads; the literal [DONE] stays a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(resp: httpx.Response, status: int, *, param: Any = ..., code: Any = ...):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------ happy paths


async def test_health_and_models() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert models["data"][0]["object"] == "model"
        assert models["data"][0]["max_model_len"] == engine.max_context
        assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
        assert_openai_error(await client.get("/v1/models/nope"), 404, code="model_not_found")


async def test_chat_non_streaming() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(temperature=0.5, seed=7))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert resp.headers["x-request-id"] == body["id"]
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": DEFAULT_REPLY}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = body["usage"]
    prompt_tokens = len(engine.encode_chat([_user("hi")]))
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == prompt_tokens + 8
    # exit pattern (2, 4, 4, 3) twice over 4 layers
    assert usage["tandem"] == {
        "n_layers": 4,
        "mean_exit_layer": 3.25,
        "early_exit_fraction": 0.5,
        "mode": "edge",
        "cloud_tokens": 0,
        "fallback_tokens": 0,
    }
    params = engine.requests[-1].params
    assert (params.temperature, params.seed, params.top_p) == (0.5, 7, 1.0)
    # chat default: what is left of the context, at most the cap
    assert params.max_tokens == min(ApiLimits().max_tokens_cap, engine.max_context - prompt_tokens)
    assert engine.finished == [body["id"]] and engine.aborted == []


async def test_completions_non_streaming_length() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "Say hi", "max_tokens": 3}
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["text"] == "Hello there! The "
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len("Say hi")
    assert body["usage"]["completion_tokens"] == 3


async def test_completions_default_max_tokens_is_16_and_list_prompt() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(COMPLETIONS, json={"model": MODEL, "prompt": ["one prompt"]})
    assert resp.status_code == 200, resp.text
    assert engine.requests[-1].params.max_tokens == 16
    assert engine.requests[-1].prompt_ids == tuple(b"one prompt")


async def test_chat_streaming_shape() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(stream=True))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
        assert "usage" not in c
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert "".join(content) == DEFAULT_REPLY
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[1:-1])
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert engine.aborted == []


async def test_chat_streaming_include_usage() -> None:
    app, engine, _ = make_app()
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=2)
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=body)
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["object"] == "chat.completion.chunk"
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2
    assert usage["tandem"]["mean_exit_layer"] == 3.0


async def test_completions_streaming_include_usage() -> None:
    app, _, _ = make_app()
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client_for(app) as client:
        resp = await client.post(COMPLETIONS, json=body)
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == DEFAULT_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["text"] == ""
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("says", "Hello there! The edge "), (["Goodbye", "edge"], "Hello there! The ")],
)
async def test_stop_strings(stop: Any, expected: str) -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(stop=stop))
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == expected
    assert choice["finish_reason"] == "stop"


async def test_max_completion_tokens_wins_over_max_tokens() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(max_tokens=5, max_completion_tokens=1))
    assert resp.json()["usage"]["completion_tokens"] == 1
    assert engine.requests[-1].params.max_tokens == 1


async def test_content_parts_developer_role_and_extra_fields() -> None:
    app, engine, _ = make_app()
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        "some_future_field": {"x": 1},
        "presence_penalty": 0,
        "user": "u1",
    }
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=body)
    assert resp.status_code == 200, resp.text
    assert engine.requests[-1].prompt_ids == tuple(b"<system>be brief<user>a\nb<assistant>")


async def test_top_p_zero_means_greedy() -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(top_p=0, temperature=0.8))
    assert resp.status_code == 200
    params = engine.requests[-1].params
    assert (params.temperature, params.top_p) == (0.0, 1.0)


# ------------------------------------------------------------------------ client errors


def _user(text: str) -> Any:
    from tandem.runtime.engine_api import ChatMessage

    return ChatMessage(role="user", content=text)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (chat_body(model="gpt-4"), "model", "model_not_found"),
        (chat_body(temperature=-0.1), "temperature", None),
        (chat_body(temperature=2.5), "temperature", None),
        (chat_body(top_p=1.5), "top_p", None),
        (chat_body(max_tokens=-1), "max_tokens", None),
        (chat_body(max_tokens=0), "max_tokens", None),
        (chat_body(max_completion_tokens=0), "max_completion_tokens", None),
        (chat_body(max_tokens=4096), "max_tokens", None),
        (chat_body(seed=2**64), "seed", None),
        (chat_body(n=2), "n", None),
        (chat_body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", None),
        (chat_body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", None),
        (chat_body(messages=[]), "messages", None),
        (chat_body(messages=[{"role": "user"}]), "messages[0]", None),
        (
            chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]),
            None,
            None,
        ),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop", None),
        (chat_body(stop=""), "stop", None),
        (chat_body(stream_options={"include_usage": True}), None, None),
        (chat_body(logprobs=True), "logprobs", None),
        (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", None),
        ({"model": MODEL}, "messages", None),
        (chat_body(messages=[{"role": "user", "content": "x" * 600}]), "messages", None),
    ],
)
async def test_chat_rejects_bad_requests(body: dict[str, Any], param: Any, code: Any) -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=body)
    status = 404 if code == "model_not_found" else 400
    err = assert_openai_error(resp, status, param=param if param is not None else ...)
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    assert engine.requests == []


async def test_over_long_prompt_is_context_length_exceeded() -> None:
    app, engine, _ = make_app(FakeEngine(max_context=64))
    async with client_for(app) as client:
        long_chat = chat_body(messages=[{"role": "user", "content": "x" * 100}])
        err = assert_openai_error(await client.post(CHAT, json=long_chat), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        fits_prompt_not_completion = {"model": MODEL, "prompt": "x" * 60, "max_tokens": 10}
        err = assert_openai_error(
            await client.post(COMPLETIONS, json=fits_prompt_not_completion), 400
        )
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert engine.requests == []


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "fake-model", "prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"model": "fake-model", "prompt": "x", "top_p": Infinity}', "top_p"),
        (b'{"model": "fake-model", "prompt": "x", "temperature": -Infinity}', "temperature"),
        (b'{"model": "fake-model", "prompt": "x", "max_tokens": 1e400}', "max_tokens"),
        (b'{"model": "fake-model", "prompt": "x", "max_tokens": 2.5}', "max_tokens"),
        (b'{"model": "fake-model", "prompt": ["a", "b"]}', "prompt"),
        (b'{"model": "fake-model", "prompt": "x", "echo": true}', "echo"),
        (b'{"model": "fake-model", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
        (b'{"model": "fake-model", "prompt": "lone \\ud800 surrogate"}', "prompt"),
        (b'{"model": "fake-model", "prompt": "x", "stop": ["\\udc00"]}', "stop[0]"),
        (b'{"model": "fake-model", "prompt": "x"', None),  # truncated JSON
        (b"", None),
        (b"[1, 2]", None),
        (b'"just a string"', None),
        (b'{"model": "fake-model", "prompt": "\xff\xfe bad utf-8"}', None),
        (b'\xef\xbb\xbf{"model": "fake-model", "prompt": "bom"}', None),
        (b"[" * 100_000 + b"]" * 100_000, None),  # nesting deeper than the recursion limit
        (b'{"model": "fake-model", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    ],
)
async def test_completions_rejects_bad_bodies(raw: bytes, param: Any) -> None:
    app, engine, _ = make_app()
    async with client_for(app) as client:
        resp = await client.post(
            COMPLETIONS, content=raw, headers={"content-type": "application/json"}
        )
    err = assert_openai_error(resp, 400)
    if param is not None:
        assert err["param"] == param
    assert engine.requests == []


async def test_body_too_large_by_content_length_and_by_stream() -> None:
    limits = ApiLimits(max_body_bytes=1000)
    app, engine, _ = make_app(limits=limits)
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 2000}])).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    async with client_for(app) as client:
        resp = await client.post(CHAT, content=big, headers={"content-type": "application/json"})
        assert_openai_error(resp, 413, code="request_too_large")
        resp = await client.post(CHAT, content=chunked())
        assert_openai_error(resp, 413, code="request_too_large")
        resp = await client.post(CHAT, content=b"{}", headers={"content-length": "abc"})
        assert_openai_error(resp, 400)
        ok = await client.post(CHAT, json=chat_body())
        assert ok.status_code == 200
    assert len(engine.requests) == 1


async def test_api_key() -> None:
    app, _, _ = make_app(api_key="sekret")
    async with client_for(app) as client:
        assert_openai_error(await client.get("/v1/models"), 401)
        resp = await client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer wrong"})
        assert_openai_error(resp, 401, code="invalid_api_key")
        resp = await client.post(CHAT, json=chat_body(), headers={"authorization": "Basic sekret"})
        assert_openai_error(resp, 401)
        ok = await client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_unknown_route_and_method_are_openai_shaped() -> None:
    app, _, _ = make_app()
    async with client_for(app) as client:
        assert_openai_error(await client.post("/v1/embeddings", json={}), 404)
        assert_openai_error(await client.get(CHAT), 405)


# ------------------------------------------------------------------------ engine errors


async def test_engine_overloaded_is_429_with_retry_after() -> None:
    app, _, _ = make_app(FakeEngine(overloaded=True))
    async with client_for(app) as client:
        for stream in (False, True):
            resp = await client.post(CHAT, json=chat_body(stream=stream))
            assert_openai_error(resp, 429, code="rate_limit_exceeded")
            assert int(resp.headers["retry-after"]) >= 1


async def test_engine_prompt_too_long_is_400() -> None:
    """The engine's own PromptTooLong (e.g. a stricter limit than the API saw) maps to 400."""
    engine = FakeEngine()

    async def refuse(request: Any) -> AsyncIterator[Any]:
        from tandem.runtime.engine_api import PromptTooLong

        raise PromptTooLong("too long")
        yield  # pragma: no cover

    engine.generate = refuse  # type: ignore[method-assign]
    app, _, _ = make_app(engine)
    async with client_for(app) as client:
        for stream in (False, True):
            resp = await client.post(CHAT, json=chat_body(stream=stream))
            assert_openai_error(resp, 400, code="context_length_exceeded")


async def test_engine_failure_mid_stream_sends_error_event_then_done() -> None:
    app, engine, _ = make_app(FakeEngine(fail_after=2))
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body(stream=True))
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    content = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert content == ["Hello ", "there! "]


async def test_engine_failure_non_streaming_is_500_openai_shaped() -> None:
    app, _, _ = make_app(FakeEngine(fail_after=2))
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body())
    err = assert_openai_error(resp, 500)
    assert err["type"] == "server_error"


# ------------------------------------------------------------------------ metrics


async def test_metrics_are_recorded() -> None:
    app, engine, metrics = make_app(FakeEngine(queue_depth=3))
    async with client_for(app) as client:
        await client.post(CHAT, json=chat_body())
        await client.post(CHAT, json=chat_body(stream=True, max_tokens=3))
        await client.post(CHAT, json=chat_body(model="nope"))
        text = (await client.get("/metrics")).text
    reg, labels = metrics.registry, {"model": MODEL}

    def value(name: str, **extra: str) -> float | None:
        return reg.get_sample_value(name, {**labels, **extra})

    assert value("tandem_edge_time_to_first_token_seconds_count") == 2
    assert value("tandem_edge_inter_token_latency_seconds_count") == 7 + 2
    assert value("tandem_edge_e2e_request_latency_seconds_count") == 2
    assert value("tandem_edge_generation_tokens_total") == 8 + 3
    assert value("tandem_edge_prompt_tokens_total") == 2 * len(engine.encode_chat([_user("hi")]))
    assert value("tandem_edge_requests_total", finish_reason="stop", status="200") == 1
    assert value("tandem_edge_requests_total", finish_reason="length", status="200") == 1
    assert value("tandem_edge_requests_total", finish_reason="none", status="404") == 1
    # exit pattern 2,4,4,3,2,4,4,3 then 2,4,4
    assert value("tandem_edge_generated_tokens_by_exit_layer_total", exit_layer="4") == 6
    assert value("tandem_edge_generated_tokens_by_exit_layer_total", exit_layer="2") == 3
    assert value("tandem_edge_generated_tokens_by_exit_layer_total", exit_layer="3") == 2
    assert value("tandem_edge_queue_depth") == 3
    assert value("tandem_edge_model_layers") == 4
    assert value("tandem_edge_requests_in_flight") == 0
    assert "tandem_edge_queue_depth" in text
    engine._queue_depth = 5
    assert value("tandem_edge_queue_depth") == 5


async def test_input_the_engine_refuses_is_a_400_not_a_500() -> None:
    """An engine (or, behind the router, an edge expert) that rejects the request's input
    with ValueError answers 400 invalid_request_error."""

    class Refusing(FakeEngine):
        def generate(self, request):
            raise ValueError("prompt is not valid for this expert")

    app, _, _ = make_app(Refusing())
    async with client_for(app) as client:
        resp = await client.post(CHAT, json=chat_body())
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error" and "not valid" in err["message"]
