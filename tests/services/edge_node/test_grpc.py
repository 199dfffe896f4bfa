"""The edge node's gRPC API over real gRPC on 127.0.0.1, with a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import pytest

try:
    from tandem_proto.edge.v1 import edge_pb2, edge_pb2_grpc
except ImportError as exc:  # generated code is built by `make proto`, never committed
    pytest.fail(f"generated gRPC code is missing ({exc}); run `make proto`", pytrace=False)

from services.edge_node.grpc_server import RunningGrpcServer, start_grpc_server
from tandem.clients.edge import (
    EdgeClient,
    EdgeInvalidRequest,
    EdgeOverloaded,
    EdgePromptTooLong,
    EdgeRpcError,
    EdgeUnauthenticated,
)
from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    PromptTooLong,
)
from tandem.runtime.sampling import SamplingParams
from tests.services.edge_node.grpc_fakes import FakeEngine

TIMEOUT = 10.0  # seconds per test, end to end


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@contextlib.asynccontextmanager
async def serving(
    engine: FakeEngine, *, server_token: str | None = None, client_token: str | None = None
) -> AsyncIterator[tuple[RunningGrpcServer, EdgeClient, edge_pb2_grpc.EdgeNodeStub]]:
    srv = await start_grpc_server(engine, "127.0.0.1", 0, token=server_token)
    target = f"127.0.0.1:{srv.port}"
    client = EdgeClient(target, token=client_token)
    channel = grpc.aio.insecure_channel(target)
    try:
        yield srv, client, edge_pb2_grpc.EdgeNodeStub(channel)
    finally:
        await client.close()
        await channel.close()
        await srv.stop(grace=None)


async def collect(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]


async def raw_error(call: Any) -> grpc.aio.AioRpcError:
    """Drain a raw streaming call and return the error it must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


def trailing(err: grpc.aio.AioRpcError, key: str) -> str | None:
    return dict(err.trailing_metadata() or ()).get(key)


def tokens(chunks: list[Any]) -> tuple[list[int], list[int], list[str], str]:
    """The per-token view of a stream of (possibly multi-token) chunks."""
    ids = [t for c in chunks for t in c.token_ids]
    layers = [x for c in chunks for x in c.exit_layers]
    sources = [s for c in chunks for s in c.sources]
    return ids, layers, sources, "".join(c.text for c in chunks)


def test_generate_streams_chunks() -> None:
    async def body() -> None:
        engine = FakeEngine(sources=("edge", "cloud", "fallback"))
        params = SamplingParams(
            max_tokens=3, temperature=0.5, top_p=0.9, seed=7, stop=("x", "yz"), ignore_eos=True
        )
        async with serving(engine) as (_, client, _stub):
            chunks = await collect(client.generate(prompt="hello", params=params, request_id="r1"))
        ids, layers, sources, text = tokens(chunks)
        assert text == "word0 word1 word2 "
        assert ids == [100, 101, 102]
        assert layers == [4, 2, 4]
        assert sources == ["edge", "cloud", "fallback"]
        assert chunks[0].token_ids == (100,)  # the first token goes out on its own, at once
        assert [c.completion_tokens for c in chunks][-1] == 3
        assert all(len(c.token_ids) == len(c.exit_layers) >= 1 for c in chunks)
        assert all(c.prompt_tokens == 5 for c in chunks)
        assert [c.finish_reason for c in chunks][-1] == "length"
        assert all(c.finish_reason is None for c in chunks[:-1])
        (req,) = engine.requests
        assert req.request_id == "r1"
        assert req.prompt_ids == tuple(ord(c) for c in "hello")
        assert req.params == params
        assert engine.completed and engine.closed.is_set()

    run(body())


def test_tokens_ready_together_go_out_in_one_message() -> None:
    """Six tokens ready at once (an engine backlog): one message, per-token data intact."""

    async def body() -> None:
        engine = FakeEngine(burst_after=0, sources=("edge", "cloud"))
        async with serving(engine) as (_, _client, stub):
            request = edge_pb2.GenerateRequest(
                prompt="hi", sampling=edge_pb2.SamplingParams(max_tokens=6)
            )
            chunks = await collect(stub.Generate(request))
        (chunk,) = chunks
        assert list(chunk.token_ids) == [100, 101, 102, 103, 104, 105]
        assert list(chunk.exit_layers) == [4, 2, 4, 2, 4, 2]
        assert list(chunk.sources) == [edge_pb2.TOKEN_SOURCE_EDGE, edge_pb2.TOKEN_SOURCE_CLOUD] * 3
        assert chunk.text == "".join(f"word{i} " for i in range(6))
        assert chunk.completion_tokens == 6
        assert chunk.finish_reason == edge_pb2.FINISH_REASON_LENGTH

    run(body())


def test_whole_answer_comes_in_one_message() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, client, _stub):
            chunks = await collect(
                client.generate(prompt="hi", params=SamplingParams(5), whole_answer=True)
            )
            streamed = await collect(client.generate(prompt="hi", params=SamplingParams(5)))
        (chunk,) = chunks
        assert tokens(chunks) == tokens(streamed)
        assert chunk.token_ids == (100, 101, 102, 103, 104)
        assert chunk.completion_tokens == 5
        assert chunk.finish_reason == "length"
        assert len(streamed) > 1  # streaming does not wait for the end

    run(body())


def test_unset_sampling_fields_take_engine_defaults_and_request_id_is_made_up() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, _client, stub):
            request = edge_pb2.GenerateRequest(
                prompt="hi", sampling=edge_pb2.SamplingParams(max_tokens=2)
            )
            chunks = await collect(stub.Generate(request))
        assert len(chunks) == 2
        assert chunks[-1].finish_reason == edge_pb2.FINISH_REASON_LENGTH
        (req,) = engine.requests
        assert req.params == SamplingParams(max_tokens=2)
        assert req.params.temperature == 1.0 and req.params.seed is None
        assert req.request_id

    run(body())


def test_chat_input() -> None:
    async def body() -> None:
        engine = FakeEngine()
        messages = [
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="yo"),
            ChatMessage(role="user", content="again"),
        ]
        async with serving(engine) as (_, client, _stub):
            chunks = await collect(
                client.generate(messages=messages, params=SamplingParams(max_tokens=2))
            )
        assert engine.chats == [tuple(messages)]
        expected = engine.encode_prompt("".join(f"<{m.role}>{m.content}" for m in messages))
        assert engine.requests[0].prompt_ids == expected
        assert chunks[0].prompt_tokens == len(expected)
        assert chunks[-1].finish_reason == "length"

    run(body())


def test_token_ids_input() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, client, _stub):
            chunks = await collect(
                client.generate(token_ids=[5, 6, 7], params=SamplingParams(max_tokens=1))
            )
        assert engine.requests[0].prompt_ids == (5, 6, 7)
        assert chunks[0].prompt_tokens == 3

    run(body())


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(
            edge_pb2.GenerateRequest(prompt="a", sampling=edge_pb2.SamplingParams(temperature=-1)),
            id="negative-temperature",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(
                prompt="a", sampling=edge_pb2.SamplingParams(temperature=float("nan"))
            ),
            id="nan-temperature",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(prompt="a", sampling=edge_pb2.SamplingParams(top_p=0)),
            id="zero-top-p",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(prompt="a", sampling=edge_pb2.SamplingParams(max_tokens=0)),
            id="zero-max-tokens",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(sampling=edge_pb2.SamplingParams(max_tokens=1)),
            id="no-input",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(prompt="", sampling=edge_pb2.SamplingParams(max_tokens=1)),
            id="empty-prompt",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(
                chat=edge_pb2.ChatMessages(messages=[edge_pb2.ChatMessage(content="hi")]),
                sampling=edge_pb2.SamplingParams(max_tokens=1),
            ),
            id="chat-role-unset",
        ),
        pytest.param(
            edge_pb2.GenerateRequest(
                chat=edge_pb2.ChatMessages(), sampling=edge_pb2.SamplingParams(max_tokens=1)
            ),
            id="chat-empty",
        ),
    ],
)
def test_invalid_request_is_invalid_argument(request_: edge_pb2.GenerateRequest) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, _client, stub):
            err = await raw_error(stub.Generate(request_))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(err, "tandem-error") == "invalid_argument"
        assert engine.requests == []

    run(body())


def test_prompt_too_long_is_invalid_argument() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, client, stub):
            request = edge_pb2.GenerateRequest(
                prompt="hello", sampling=edge_pb2.SamplingParams(max_tokens=60)
            )
            err = await raw_error(stub.Generate(request))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert trailing(err, "tandem-error") == "prompt_too_long"
            assert "64" in (err.details() or "")

            with pytest.raises(PromptTooLong) as info:
                await collect(client.generate(prompt="hello", params=SamplingParams(60)))
            assert isinstance(info.value, EdgePromptTooLong)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    run(body())


def test_overload_is_resource_exhausted() -> None:
    async def body() -> None:
        engine = FakeEngine(overloaded=True)
        async with serving(engine) as (_, client, stub):
            request = edge_pb2.GenerateRequest(
                prompt="hi", sampling=edge_pb2.SamplingParams(max_tokens=1)
            )
            err = await raw_error(stub.Generate(request))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            with pytest.raises(EngineOverloaded) as info:
                await collect(client.generate(prompt="hi", params=SamplingParams(1)))
            assert isinstance(info.value, EdgeOverloaded)
            assert info.value.retryable_elsewhere

    run(body())


def test_engine_failure_mid_stream_is_internal() -> None:
    async def body() -> None:
        engine = FakeEngine(fail_after=2)
        async with serving(engine) as (_, client, _stub):
            seen = []
            with pytest.raises(EdgeRpcError) as info:
                async for chunk in client.generate(prompt="hi", params=SamplingParams(5)):
                    seen.append(chunk)
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "kernel exploded" in info.value.details
        assert "".join(c.text for c in seen) == "word0 word1 "  # delivered before the error
        assert engine.closed.is_set()

    run(body())


def test_client_invalid_input_fails_before_any_call() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serving(engine) as (_, client, _stub):
            with pytest.raises(ValueError, match="exactly one"):
                await collect(client.generate(prompt="a", token_ids=[1]))
            bad_role = ChatMessage(role="tool", content="x")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="role"):
                await collect(client.generate(messages=[bad_role]))
            with pytest.raises(EdgeInvalidRequest):  # server-side check
                await collect(client.generate(prompt="", params=SamplingParams(1)))
        assert engine.requests == []

    run(body())


@pytest.mark.parametrize("plain_iterator", [False, True], ids=["async-generator", "iterator"])
def test_raw_cancel_closes_engine_iterator(plain_iterator: bool) -> None:
    async def body() -> None:
        engine = FakeEngine(hang_after=1, plain_iterator=plain_iterator)
        async with serving(engine) as (_, _client, stub):
            request = edge_pb2.GenerateRequest(
                prompt="hi", sampling=edge_pb2.SamplingParams(max_tokens=10)
            )
            call = stub.Generate(request)
            first = await call.read()
            assert first.text == "word0 "
            assert not engine.closed.is_set()
            call.cancel()
            await asyncio.wait_for(engine.closed.wait(), 5)
        assert not engine.completed

    run(body())


def test_client_closing_generate_closes_engine_iterator() -> None:
    async def body() -> None:
        engine = FakeEngine(hang_after=2)
        async with serving(engine) as (_, client, _stub):
            async with contextlib.aclosing(
                client.generate(prompt="hi", params=SamplingParams(10))
            ) as chunks:
                async for chunk in chunks:
                    if chunk.completion_tokens == 2:
                        break
            await asyncio.wait_for(engine.closed.wait(), 5)
        assert not engine.completed

    run(body())


def test_deadline_closes_engine_iterator() -> None:
    async def body() -> None:
        engine = FakeEngine(hang_after=0)
        async with serving(engine) as (_, client, _stub):
            with pytest.raises(EdgeRpcError) as info:
                await collect(client.generate(prompt="hi", params=SamplingParams(3), timeout=0.3))
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(engine.closed.wait(), 5)
        assert not engine.completed

    run(body())


def test_info_and_health() -> None:
    async def body() -> None:
        engine = FakeEngine(depth=3)
        async with serving(engine) as (srv, client, _stub):
            info = await client.info()
            assert (info.model_id, info.n_layers, info.max_context, info.queue_depth) == (
                "fake-model",
                4,
                64,
                3,
            )
            health = await client.health()
            assert health.serving and health.queue_depth == 3
            srv.servicer.set_serving(False)
            health = await client.health()
            assert health.status == "not_serving" and not health.serving

    run(body())


def test_auth_token() -> None:
    async def body() -> None:
        engine = FakeEngine()
        params = SamplingParams(max_tokens=1)
        async with serving(engine, server_token="s3cret", client_token="s3cret") as (
            srv,
            good,
            stub,
        ):
            chunks = await collect(good.generate(prompt="hi", params=params))
            assert chunks[-1].finish_reason == "length"
            assert (await good.info()).model_id == "fake-model"

            target = f"127.0.0.1:{srv.port}"
            async with EdgeClient(target) as anonymous, EdgeClient(target, token="nope") as wrong:
                for client in (anonymous, wrong):
                    with pytest.raises(EdgeUnauthenticated):
                        await collect(client.generate(prompt="hi", params=params))
                    with pytest.raises(EdgeUnauthenticated):
                        await client.info()
                    assert (await client.health()).serving  # probes need no token

            request = edge_pb2.GenerateRequest(
                prompt="hi", sampling=edge_pb2.SamplingParams(max_tokens=1)
            )
            err = await raw_error(stub.Generate(request, metadata=(("authorization", "s3cret"),)))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(engine.requests) == 1  # rejected calls never reached the engine

    run(body())


def test_grpc_sampling_keeps_the_http_api_limits() -> None:
    from services.edge_node.grpc_server import sampling_from_proto
    from tandem.api.limits import ApiLimits

    cap = ApiLimits().max_tokens_cap
    with pytest.raises(ValueError, match="max_tokens is too large"):
        sampling_from_proto(edge_pb2.SamplingParams(max_tokens=cap + 1))
    with pytest.raises(ValueError, match="stop sequences"):
        sampling_from_proto(edge_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"]))
    assert sampling_from_proto(edge_pb2.SamplingParams(max_tokens=cap)).max_tokens == cap
