"""A small typed async client for the edge node's gRPC API (tandem.edge.v1.EdgeNode).

It speaks the engine's own types (`GenerationChunk`, `ChatMessage`, `SamplingParams`) and
raises the engine's exception types, so a caller (the router) handles a remote edge node the
way it would handle a local engine:

    async with EdgeClient("127.0.0.1:50051", token="...") as client:
        async with contextlib.aclosing(client.generate(prompt="hi")) as chunks:
            async for chunk in chunks:
                ...

Each chunk is one message of the stream: every token the node produced since its previous
write (per-token ids, exit layers and sources in order); `whole_answer=True` (for a caller
that needs only the whole answer) lets the node send it all in one message at the end.

Closing the `generate` iterator early cancels the call; the node then aborts the request.
Every failure is an `EdgeRpcError` (with the gRPC `code`); the ones with an engine
equivalent also subclass it: `EdgeOverloaded` is an `EngineOverloaded`, `EdgeInvalidRequest`
a `ValueError`, `EdgePromptTooLong` a `PromptTooLong`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    FinishReason,
    GenerationChunk,
    PromptTooLong,
    TokenSource,
)
from tandem.runtime.sampling import SamplingParams
from tandem.transport.grpc_tls import TlsConfig, aio_channel
from tandem_proto.edge.v1 import edge_pb2, edge_pb2_grpc

ERROR_KEY = "tandem-error"  # trailing metadata set by grpc_server

_ROLES: dict[str, int] = {
    "system": edge_pb2.ChatMessage.ROLE_SYSTEM,
    "user": edge_pb2.ChatMessage.ROLE_USER,
    "assistant": edge_pb2.ChatMessage.ROLE_ASSISTANT,
}
_FINISH: dict[int, FinishReason | None] = {
    edge_pb2.FINISH_REASON_UNSPECIFIED: None,
    edge_pb2.FINISH_REASON_STOP: "stop",
    edge_pb2.FINISH_REASON_LENGTH: "length",
    edge_pb2.FINISH_REASON_ABORT: "abort",
}
_SOURCES: dict[int, TokenSource] = {
    edge_pb2.TOKEN_SOURCE_EDGE: "edge",
    edge_pb2.TOKEN_SOURCE_CLOUD: "cloud",
    edge_pb2.TOKEN_SOURCE_FALLBACK: "fallback",
}


class EdgeRpcError(Exception):
    """A failed call to an edge node. `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def retryable_elsewhere(self) -> bool:
        """The node could not serve this request, but another replica may."""
        return self.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


class EdgeInvalidRequest(EdgeRpcError, ValueError):
    """INVALID_ARGUMENT: bad input or sampling parameters."""


class EdgePromptTooLong(EdgeInvalidRequest, PromptTooLong):
    """INVALID_ARGUMENT: prompt tokens + max_tokens exceed the node's context."""


class EdgeOverloaded(EdgeRpcError, EngineOverloaded):
    """RESOURCE_EXHAUSTED: the node's admission queue is full."""


class EdgeUnauthenticated(EdgeRpcError):
    """UNAUTHENTICATED: the node wants a (different) bearer token."""


def error_from_rpc(exc: grpc.aio.AioRpcError) -> EdgeRpcError:
    code = exc.code()
    details = exc.details() or ""
    kind = ""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KEY:
            kind = value.decode() if isinstance(value, bytes) else value
    if kind == "prompt_too_long":
        return EdgePromptTooLong(code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EdgeInvalidRequest(code, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return EdgeOverloaded(code, details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return EdgeUnauthenticated(code, details)
    return EdgeRpcError(code, details)


@dataclass(frozen=True)
class EdgeInfo:
    model_id: str
    n_layers: int
    max_context: int
    queue_depth: int


@dataclass(frozen=True)
class EdgeHealth:
    status: Literal["serving", "not_serving", "unknown"]
    queue_depth: int

    @property
    def serving(self) -> bool:
        return self.status == "serving"


def sampling_to_proto(params: SamplingParams) -> edge_pb2.SamplingParams:
    msg = edge_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def build_generate_request(
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage] | None = None,
    token_ids: Sequence[int] | None = None,
    params: SamplingParams | None = None,
    request_id: str = "",
    whole_answer: bool = False,
    score_prompt: bool = False,
) -> edge_pb2.GenerateRequest:
    """Exactly one of prompt, messages, token_ids. Raises ValueError otherwise."""
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("pass exactly one of prompt, messages, token_ids")
    req = edge_pb2.GenerateRequest(
        request_id=request_id,
        sampling=sampling_to_proto(params or SamplingParams()),
        whole_answer=whole_answer,
        score_prompt=score_prompt,
    )
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        try:
            chat = [edge_pb2.ChatMessage(role=_ROLES[m.role], content=m.content) for m in messages]
        except KeyError as exc:
            raise ValueError(f"unknown chat role {exc.args[0]!r}") from None
        req.chat.messages.extend(chat)
    else:
        assert token_ids is not None
        req.token_ids.ids.extend(token_ids)
    return req


def chunk_from_proto(msg: edge_pb2.GenerateChunk) -> GenerationChunk:
    """One engine chunk per message (it may hold several tokens). The node's energy and
    prompt score, where it sent them, go in ``report``."""
    report: dict[str, Any] = {}
    if msg.HasField("energy_joules"):
        report.update(energy_joules=msg.energy_joules, energy_source=msg.energy_source)
    if msg.HasField("prompt_score"):
        p = msg.prompt_score
        report["prompt_score"] = {
            "prompt_nll": p.prompt_nll,
            "prompt_tokens": p.prompt_tokens,
            "mean_entropy": p.mean_entropy,
            "last_entropy": p.last_entropy,
            "last_top1": p.last_top1,
        }
    return GenerationChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        exit_layers=tuple(msg.exit_layers),
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        finish_reason=_FINISH.get(msg.finish_reason),
        sources=tuple(_SOURCES.get(s, "edge") for s in msg.sources),
        report=report or None,
    )


class EdgeClient:
    """Async client for one edge node. Create and use it inside a running event loop."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        options: Sequence[tuple[str, int | str]] | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.target = target
        self._tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = list(options or ())
        self._channel: grpc.aio.Channel | None = None
        self._stub: edge_pb2_grpc.EdgeNodeStub | None = None

    def _get_stub(self) -> edge_pb2_grpc.EdgeNodeStub:
        if self._stub is None:
            self._channel = aio_channel(self.target, self._tls, self._options)
            self._stub = edge_pb2_grpc.EdgeNodeStub(self._channel)
        return self._stub

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel connects. Raises TimeoutError."""
        self._get_stub()
        assert self._channel is not None
        async with asyncio.timeout(timeout):
            await self._channel.channel_ready()

    async def generate(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        token_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        whole_answer: bool = False,
        score_prompt: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request (exactly one of prompt, messages, token_ids).
        `timeout` bounds the whole stream (a gRPC deadline). `whole_answer`: the caller
        waits for the end anyway, so the node may send everything in one chunk.
        `score_prompt`: the last chunk's report carries the node's "prompt_score" (a dict of
        edge.proto PromptScore's fields) where the node can score."""
        request = build_generate_request(
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            params=params,
            request_id=request_id,
            whole_answer=whole_answer,
            score_prompt=score_prompt,
        )
        call = self._get_stub().Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for msg in call:
                chunk = chunk_from_proto(msg)
                yield chunk
                if chunk.finish_reason is not None:
                    # The answer is complete: the node sends nothing after its last chunk
                    # but the OK status, so do not wait for it (one wake-up less per call).
                    return
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()  # no-op once finished; otherwise the node aborts the request

    async def info(self, *, timeout: float | None = 10.0) -> EdgeInfo:
        try:
            reply = await self._get_stub().Info(
                edge_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return EdgeInfo(
            model_id=reply.model_id,
            n_layers=reply.n_layers,
            max_context=reply.max_context,
            queue_depth=reply.queue_depth,
        )

    async def health(self, *, timeout: float | None = 5.0) -> EdgeHealth:
        try:
            reply = await self._get_stub().Health(edge_pb2.HealthRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        status: Literal["serving", "not_serving", "unknown"] = "unknown"
        if reply.status == edge_pb2.HealthReply.STATUS_SERVING:
            status = "serving"
        elif reply.status == edge_pb2.HealthReply.STATUS_NOT_SERVING:
            status = "not_serving"
        return EdgeHealth(status=status, queue_depth=reply.queue_depth)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> EdgeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
