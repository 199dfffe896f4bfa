"""`OpenAIEngine` against real OpenAI-compatible upstreams: the edge node's HTTP API (over
fake engines, no models) under uvicorn on 127.0.0.1, reached over real HTTP. Dead replicas
are closed ports."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from services.router.expert_engine import ExpertUnavailable, served
from services.router.experts import ExpertConfig
from services.router.openai_engine import (
    OpenAIEngine,
    UpstreamError,
    UpstreamInvalidRequest,
    _StreamParser,
)
from services.router.replicas import HealthMonitor, OpenAIProber, ReplicaTable
from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tandem.runtime.engine_api import ChatMessage, GenerationChunk, GenerationRequest
from tandem.runtime.sampling import SamplingParams
from tests.api.fakes import DEFAULT_REPLY, FakeEngine
from tests.api.live_server import live_server

TIMEOUT = 10.0  # seconds per test, end to end
EXPERT = "coder"
UPSTREAM_MODEL = "fake/upstream-model"
KEY = "upstream-key"
MESSAGES = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))


@dataclass
class Upstream:
    base: str  # http://127.0.0.1:port, without /v1
    engine: FakeEngine

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"


@dataclass
class Upstreams:
    ok: Upstream
    blocking: Upstream  # blocks after 2 tokens
    failing: Upstream  # fails after 2 tokens
    overloaded: Upstream  # 429 on every generation
    broken: Upstream  # fails before the first token: HTTP 500


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    engines = {
        "ok": FakeEngine(model_id=UPSTREAM_MODEL),
        "blocking": FakeEngine(model_id=UPSTREAM_MODEL, block_after=2),
        "failing": FakeEngine(model_id=UPSTREAM_MODEL, fail_after=2),
        "overloaded": FakeEngine(model_id=UPSTREAM_MODEL, overloaded=True),
        "broken": FakeEngine(model_id=UPSTREAM_MODEL, fail_after=0),
    }
    with ExitStack() as stack:
        running = {}
        for name, engine in engines.items():
            app = build_app(
                engine,
                served_model_id=UPSTREAM_MODEL,
                limits=ApiLimits(),
                metrics=ApiMetrics(CollectorRegistry(), model_name=UPSTREAM_MODEL),
                api_key=KEY,
            )
            running[name] = Upstream(stack.enter_context(live_server(app)), engine)
        yield Upstreams(**running)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def dead_url() -> str:
    """A base URL on a port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def make_engine(
    *bases: str,
    token: str | None = KEY,
    model: str | None = UPSTREAM_MODEL,
    attempts: int = 2,
    healthy: bool = True,
) -> OpenAIEngine:
    table = ReplicaTable(
        [ExpertConfig(EXPERT, "openai", tuple(bases), "cpu", token=token, model=model)],
        failure_threshold=1,
    )
    if healthy:
        for replica in table.replicas():
            table.record_success(replica)
    return OpenAIEngine(
        EXPERT,
        table,
        max_context=512,
        upstream_model=model,
        attempts=attempts,
        timeout_s=5.0,
    )


def chat_request(**params: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-chat",
        prompt_ids=(0,) * 64,
        params=SamplingParams(**params),
        chat_messages=MESSAGES,
    )


def completion_request(prompt: str = "once upon", **params: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-cmpl",
        prompt_ids=(0,) * len(prompt),
        params=SamplingParams(**params),
        prompt_text=prompt,
    )


async def collect(engine: OpenAIEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def direct(upstream: Upstream, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The upstream's own non-streaming answer, asked directly."""
    response = httpx.post(
        f"{upstream.v1}/{path}",
        json={"model": UPSTREAM_MODEL, **body},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


# -- streaming ---------------------------------------------------------------------------------


def test_chat_stream_matches_upstream_with_usage(upstreams: Upstreams) -> None:
    up = upstreams.ok
    expected = direct(
        up,
        "chat/completions",
        {"messages": [{"role": m.role, "content": m.content} for m in MESSAGES], "max_tokens": 50},
    )

    async def body() -> None:
        engine = make_engine(up.v1)
        holder: dict[str, str] = {}
        token = served.set(holder)
        try:
            chunks = await collect(engine, chat_request(max_tokens=50))
        finally:
            served.reset(token)
            await engine.close()
        text = "".join(c.text for c in chunks)
        assert text == expected["choices"][0]["message"]["content"] == DEFAULT_REPLY
        assert len([c for c in chunks if c.text]) == len(DEFAULT_REPLY.split())  # incremental
        assert all(c.finish_reason is None for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == "stop"
        assert last.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert last.completion_tokens == expected["usage"]["completion_tokens"] > 0
        assert holder == {"replica": up.v1}
        assert engine.table.status(engine.table.replicas()[0]).in_flight == 0

    run(body())


def test_completion_stream_maps_sampling_params_and_length(upstreams: Upstreams) -> None:
    up = upstreams.ok
    expected = direct(up, "completions", {"prompt": "once upon", "max_tokens": 3})
    params = {"max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ("zzz",)}

    async def body() -> None:
        engine = make_engine(up.v1)
        try:
            chunks = await collect(engine, completion_request(**params))
        finally:
            await engine.close()
        assert "".join(c.text for c in chunks) == expected["choices"][0]["text"]
        assert "".join(c.text for c in chunks) == "Hello there! The "
        assert chunks[-1].finish_reason == "length" == expected["choices"][0]["finish_reason"]
        assert chunks[-1].prompt_tokens == len("once upon")
        assert chunks[-1].completion_tokens == 3
        seen = up.engine.requests[-1]
        assert seen.params == SamplingParams(**params)
        assert seen.prompt_text == "once upon"

    run(body())


def test_stop_strings_and_seed_reach_the_upstream(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.ok.v1)
        try:
            chunks = await collect(engine, chat_request(max_tokens=50, stop=("says",)))
        finally:
            await engine.close()
        assert "".join(c.text for c in chunks) == "Hello there! The edge "
        assert chunks[-1].finish_reason == "stop"
        assert upstreams.ok.engine.requests[-1].chat_messages == MESSAGES

    run(body())


# -- auth and configuration --------------------------------------------------------------------


def test_replica_found_healthy_by_the_prober_serves(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.ok.v1, dead_url(), healthy=False)
        monitor = HealthMonitor(engine.table, OpenAIProber(timeout_s=1.0), timeout_s=1.0)
        await monitor.check_once()
        await monitor.prober.close()
        assert [s.healthy for s in engine.table.statuses(EXPERT)] == [True, False]
        try:
            chunks = await collect(engine, chat_request(max_tokens=2))
        finally:
            await engine.close()
        assert "".join(c.text for c in chunks) == "Hello there! "

    run(body())


@pytest.mark.parametrize(
    ("token", "model", "status"),
    [(None, UPSTREAM_MODEL, "401"), ("wrong", UPSTREAM_MODEL, "401"), (KEY, "other", "404")],
)
def test_wrong_token_or_model_is_unavailable_not_a_client_error(
    upstreams: Upstreams, token: str | None, model: str, status: str
) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.ok.v1, token=token, model=model)
        try:
            with pytest.raises(ExpertUnavailable, match=status):
                await collect(engine, chat_request(max_tokens=2))
        finally:
            await engine.close()
        assert not engine.table.status(engine.table.replicas()[0]).healthy

    run(body())


# -- failover ----------------------------------------------------------------------------------


def test_dead_first_replica_fails_over_to_the_live_one(upstreams: Upstreams) -> None:
    async def body() -> None:
        dead = dead_url()
        engine = make_engine(dead, upstreams.ok.v1)
        assert engine.table.pick(EXPERT).address == dead  # config order breaks the tie
        holder: dict[str, str] = {}
        token = served.set(holder)
        try:
            chunks = await collect(engine, completion_request(max_tokens=2))
        finally:
            served.reset(token)
            await engine.close()
        assert "".join(c.text for c in chunks) == "Hello there! "
        assert holder == {"replica": upstreams.ok.v1}
        statuses = engine.table.statuses(EXPERT)
        assert statuses[0].consecutive_failures == 1 and not statuses[0].healthy
        assert statuses[1].healthy

    run(body())


def test_all_replicas_dead_is_expert_unavailable() -> None:
    async def body() -> None:
        engine = make_engine(dead_url(), dead_url())
        try:
            with pytest.raises(ExpertUnavailable, match="ConnectError|connect"):
                await collect(engine, chat_request(max_tokens=2))
        finally:
            await engine.close()

    run(body())


def test_no_healthy_replica_is_expert_unavailable(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.ok.v1, healthy=False)
        try:
            with pytest.raises(ExpertUnavailable, match="no healthy replica"):
                await collect(engine, chat_request(max_tokens=2))
        finally:
            await engine.close()

    run(body())


def test_overloaded_upstream_fails_over_without_losing_health(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.overloaded.v1, upstreams.ok.v1)
        try:
            chunks = await collect(engine, chat_request(max_tokens=2))
            assert "".join(c.text for c in chunks) == "Hello there! "
            alone = make_engine(upstreams.overloaded.v1)
            with pytest.raises(ExpertUnavailable, match="429"):
                await collect(alone, chat_request(max_tokens=2))
            await alone.close()
        finally:
            await engine.close()
        assert all(s.healthy for s in engine.table.statuses(EXPERT))  # 429 is a live "no"
        assert all(s.healthy for s in alone.table.statuses(EXPERT))

    run(body())


# -- errors ------------------------------------------------------------------------------------


def test_upstream_400_is_a_value_error_with_its_message(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.ok.v1)
        try:
            with pytest.raises(ValueError, match="maximum context length is 512") as info:
                await collect(engine, chat_request(max_tokens=600))
        finally:
            await engine.close()
        assert isinstance(info.value, UpstreamInvalidRequest)
        assert info.value.status == 400 and info.value.code == "context_length_exceeded"
        assert engine.table.statuses(EXPERT)[0].consecutive_failures == 0

    run(body())


def test_upstream_500_is_an_upstream_error_not_retried(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.broken.v1, upstreams.ok.v1)
        n_ok = len(upstreams.ok.engine.requests)
        try:
            with pytest.raises(UpstreamError, match="HTTP 500"):
                await collect(engine, chat_request(max_tokens=2))
        finally:
            await engine.close()
        assert len(upstreams.ok.engine.requests) == n_ok

    run(body())


def test_error_event_mid_stream_raises_after_the_chunks(upstreams: Upstreams) -> None:
    async def body() -> None:
        engine = make_engine(upstreams.failing.v1)
        texts: list[str] = []
        try:
            with pytest.raises(UpstreamError, match="upstream error in the stream") as info:
                async for chunk in engine.generate(chat_request(max_tokens=50)):
                    texts.append(chunk.text)
        finally:
            await engine.close()
        assert not isinstance(info.value, ValueError)
        assert "".join(texts) == "Hello there! "

    run(body())


# -- cancellation ------------------------------------------------------------------------------


def test_closing_early_aborts_the_upstream_request(upstreams: Upstreams) -> None:
    up = upstreams.blocking

    async def body() -> None:
        engine = make_engine(up.v1)
        n_before = len(up.engine.requests)
        it = engine.generate(chat_request(max_tokens=50))
        try:
            first = await asyncio.wait_for(anext(it), 5)
            second = await asyncio.wait_for(anext(it), 5)
            assert first.text + second.text == "Hello there! "
            await asyncio.wait_for(it.aclose(), 5)  # type: ignore[attr-defined]
            assert engine.table.statuses(EXPERT)[0].in_flight == 0
            assert len(up.engine.requests) == n_before + 1
            rid = up.engine.requests[-1].request_id
            async with asyncio.timeout(5):
                while rid not in up.engine.aborted:
                    await asyncio.sleep(0.02)
        finally:
            await engine.close()

    run(body())


# -- stream shapes the edge API does not send (vLLM and others) ---------------------------------


def test_parser_estimates_counts_without_usage_and_maps_finish_reasons() -> None:
    parser = _StreamParser(chat=True, prompt_tokens=40)
    assert parser.event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) is None
    a = parser.event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    b = parser.event({"choices": [{"index": 0, "delta": {"content": " you"}}]})
    assert a is not None and b is not None
    assert (a.text, a.completion_tokens, b.completion_tokens) == ("Hi", 1, 2)
    parser.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    last = parser.final()
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 40, 2)

    # usage that says 0 completion tokens although text came: never 0
    parser = _StreamParser(chat=False, prompt_tokens=9)
    parser.event({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
    parser.event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}})
    last = parser.final()
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 3, 1)


def test_parser_error_events() -> None:
    # vLLM reports some validation errors as an event before any text: the client's fault
    parser = _StreamParser(chat=True, prompt_tokens=1)
    with pytest.raises(UpstreamInvalidRequest, match="bad stop"):
        parser.event({"error": {"message": "bad stop", "type": "BadRequestError", "code": 400}})
    # after text, any error event is the upstream's failure
    parser = _StreamParser(chat=True, prompt_tokens=1)
    parser.event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    with pytest.raises(UpstreamError, match="boom"):
        parser.event({"error": {"message": "boom", "code": 400}})
    # a stream cut short, with neither finish_reason nor [DONE]
    parser = _StreamParser(chat=True, prompt_tokens=1)
    with pytest.raises(UpstreamError, match="ended without"):
        parser.final()


def test_generate_needs_text() -> None:
    engine = make_engine("http://127.0.0.1:1/v1")
    request = GenerationRequest("r", (1, 2), SamplingParams())
    with pytest.raises(ValueError, match="prompt_text or chat_messages"):
        engine.generate(request)


def test_injected_client_is_used_and_left_open(upstreams: Upstreams) -> None:
    async def body() -> None:
        async with httpx.AsyncClient() as client:
            table = ReplicaTable(
                [ExpertConfig(EXPERT, "openai", (upstreams.ok.v1,), "cpu", token=KEY)]
            )
            table.record_success(table.replicas()[0])
            engine = OpenAIEngine(
                EXPERT, table, max_context=512, upstream_model=UPSTREAM_MODEL, client=client
            )
            chunks = await collect(engine, chat_request(max_tokens=1))
            await engine.close()
            assert "".join(c.text for c in chunks) == "Hello "
            assert not client.is_closed

    run(body())
