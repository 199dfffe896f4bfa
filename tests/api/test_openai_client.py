"""A real uvicorn server on 127.0.0.1 (free port, in a thread) driven by the `openai` SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tests.api.fakes import DEFAULT_REPLY, FakeEngine
from tests.api.live_server import live_server

MODEL = "fake-model"
API_KEY = "test-key"


@dataclass
class Server:
    base_url: str
    engine: FakeEngine


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = FakeEngine(token_delay_s=0.002)
    metrics = ApiMetrics(CollectorRegistry(), model_name=MODEL)
    app = build_app(
        engine, served_model_id=MODEL, limits=ApiLimits(), metrics=metrics, api_key=API_KEY
    )
    with live_server(app) as base_url:
        yield Server(base_url, engine)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=10
    ) as c:
        yield c


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
        temperature=0.0,
        max_completion_tokens=100,
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == DEFAULT_REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    tandem = resp.usage.model_extra["tandem"]  # type: ignore[index]
    assert tandem["n_layers"] == 4 and 0 <= tandem["early_exit_fraction"] <= 1


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        stop=["Goodbye"],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there! The edge says hi. "
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Say hello", max_tokens=2)
    assert resp.choices[0].text == "Hello there! "
    assert resp.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt="Say hello", max_tokens=2, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "Hello there! "


def test_errors_map_to_sdk_exceptions(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=2
        )
    assert br.value.param == "n"
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_streaming_client_disconnect_aborts(server: Server) -> None:
    engine = server.engine
    engine.token_delay_s = 0.05  # 8 tokens -> ~0.4 s; the client leaves after the first
    try:
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}
            headers = {"authorization": f"Bearer {API_KEY}"}
            with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # the role chunk arrived; now hang up
        rid = engine.requests[-1].request_id
        deadline = time.monotonic() + 5
        while rid not in engine.aborted:
            assert time.monotonic() < deadline, "engine iterator was not closed"
            time.sleep(0.01)
        assert rid not in engine.finished
    finally:
        engine.token_delay_s = 0.002
