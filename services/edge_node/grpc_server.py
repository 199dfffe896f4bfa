"""The edge node's gRPC front end (service tandem.edge.v1.EdgeNode) over an `Engine`.

Error mapping (the gRPC status, plus a `tandem-error` trailing-metadata key that lets
`grpc_client.EdgeClient` raise the same exception types a local engine would):

    PromptTooLong     -> INVALID_ARGUMENT    tandem-error: prompt_too_long
    ValueError        -> INVALID_ARGUMENT    tandem-error: invalid_argument
    EngineOverloaded  -> RESOURCE_EXHAUSTED  tandem-error: overloaded
    anything else     -> INTERNAL            tandem-error: internal

Output is written in chunks, never one message per token when more are ready: while one write
is on its way, what the engine produces next is gathered and goes out as the next message
(one message per token only when the engine is slower than the stream, as at batch 1). A
request with `whole_answer` (a non-streaming caller) gets its output in one message at the
end. Per-token data (ids, exit layers, sources) stays per token in the repeated fields.

A cancelled call (client gone, deadline passed) closes the engine's iterator, which aborts
the request and frees its KV cache. With a token configured, Generate and Info require the
metadata `authorization: Bearer <token>`; Health never does (probes carry no credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import grpc

from services.edge_node.prompt_score import ModelPromptScorer
from tandem.api.limits import ApiLimits
from tandem.runtime.engine_api import (
    ChatMessage,
    Engine,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from tandem.runtime.sampling import SamplingParams
from tandem.transport.grpc_auth import ERROR_KEY, BearerAuth
from tandem.transport.grpc_tls import TlsConfig, add_port
from tandem_proto.edge.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)
DEFAULT_LIMITS = ApiLimits()
MAX_CONCURRENT_RPCS = 1024


_ROLES: dict[int, str] = {
    edge_pb2.ChatMessage.ROLE_SYSTEM: "system",
    edge_pb2.ChatMessage.ROLE_USER: "user",
    edge_pb2.ChatMessage.ROLE_ASSISTANT: "assistant",
}
_FINISH: dict[str | None, int] = {
    None: edge_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": edge_pb2.FINISH_REASON_STOP,
    "length": edge_pb2.FINISH_REASON_LENGTH,
    "abort": edge_pb2.FINISH_REASON_ABORT,
}
_SOURCES: dict[str, int] = {
    "edge": edge_pb2.TOKEN_SOURCE_EDGE,
    "cloud": edge_pb2.TOKEN_SOURCE_CLOUD,
    "fallback": edge_pb2.TOKEN_SOURCE_FALLBACK,
}


def sampling_from_proto(
    msg: edge_pb2.SamplingParams, limits: ApiLimits = DEFAULT_LIMITS
) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults. The HTTP API's explicit limits
    (max_tokens cap, number of stop strings) hold here too. Raises ValueError."""
    defaults = SamplingParams()
    if msg.HasField("max_tokens") and msg.max_tokens > limits.max_tokens_cap:
        raise ValueError(
            f"max_tokens is too large: {msg.max_tokens}; at most {limits.max_tokens_cap}"
        )
    if len(msg.stop) > limits.max_stop:
        raise ValueError(f"at most {limits.max_stop} stop sequences are allowed")
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
    )


def chunks_to_proto(chunks: Sequence[GenerationChunk]) -> edge_pb2.GenerateChunk:
    """One message for consecutive engine chunks (at least one): their text joined, their
    per-token fields concatenated, the counts and finish reason of the last."""
    last = chunks[-1]
    if len(chunks) == 1:
        text, ids, layers, sources = last.text, last.token_ids, last.exit_layers, last.sources
    else:
        text = "".join(c.text for c in chunks)
        ids = [t for c in chunks for t in c.token_ids]
        layers = [x for c in chunks for x in c.exit_layers]
        sources = [s for c in chunks for s in c.sources]
    msg = edge_pb2.GenerateChunk(
        text=text,
        token_ids=ids,
        exit_layers=layers,
        sources=[_SOURCES[s] for s in sources],
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        finish_reason=_FINISH[last.finish_reason],
    )
    report = last.report or {}
    if "energy_joules" in report:  # the engine's meter (usage.tandem over HTTP)
        msg.energy_joules = float(report["energy_joules"])
        msg.energy_source = str(report.get("energy_source", "modelled"))
    if "prompt_score" in report:  # asked for with score_prompt (see Generate)
        msg.prompt_score.CopyFrom(edge_pb2.PromptScore(**report["prompt_score"]))
    return msg


def chunk_to_proto(chunk: GenerationChunk) -> edge_pb2.GenerateChunk:
    return chunks_to_proto((chunk,))


async def write_coalesced(
    stream: AsyncIterator[GenerationChunk], context: grpc.aio.ServicerContext
) -> None:
    """Write `stream` to the call: each message carries everything the engine produced
    while the previous write was in flight (the first chunk goes out at once). Reading the
    engine never waits for the network."""
    pending: list[GenerationChunk] = []
    wake = asyncio.Event()
    ended = False

    async def writer() -> None:
        nonlocal pending
        while True:
            if not pending:
                if ended:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch, pending = pending, []
            await context.write(chunks_to_proto(batch))

    task = asyncio.create_task(writer())
    error: Exception | None = None
    try:
        try:
            async for chunk in stream:
                pending.append(chunk)
                wake.set()
                if task.done():  # the write failed: stop reading (its error is raised below)
                    break
        except Exception as exc:  # the engine failed: first deliver what it produced
            error = exc
        ended = True
        wake.set()
        await task
    finally:
        if not task.done():  # cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if error is not None:
        raise error


def _error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, PromptTooLong):
        return grpc.StatusCode.INVALID_ARGUMENT, "prompt_too_long"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"
    if isinstance(exc, EngineOverloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"
    return grpc.StatusCode.INTERNAL, "internal"


async def _aclose(iterator: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _with_prompt_score(
    stream: AsyncIterator[GenerationChunk], score: asyncio.Future
) -> AsyncIterator[GenerationChunk]:
    """``stream`` with the prompt's score (`prompt_score.PromptScore`) in its last chunk's
    report; a scoring that failed leaves it out (logged). Closing it closes ``stream`` (the
    engine then aborts the request)."""
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            if chunk.finish_reason is not None:
                try:
                    value = await score
                except Exception:
                    log.exception("scoring the prompt failed")
                else:
                    report = {**(chunk.report or {}), "prompt_score": value}
                    chunk = replace(chunk, report=report)
            yield chunk


def _score_text(request: edge_pb2.GenerateRequest) -> str | None:
    """The text a prompt score is computed on: the raw prompt, or the chat messages'
    contents joined by newlines (the router's gate text); None for token ids."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt
    if kind == "chat":
        return "\n".join(m.content for m in request.chat.messages)
    return None


class EdgeServicer(edge_pb2_grpc.EdgeNodeServicer):
    """Implements tandem.edge.v1.EdgeNode with grpc.aio on top of one engine. ``scorer``
    scores prompts for requests with ``score_prompt`` (default: one on the engine's model
    where it has a full-depth decoder; None: such requests get no score)."""

    def __init__(self, engine: Engine, scorer: ModelPromptScorer | None = None) -> None:
        self._engine = engine
        self._serving = True
        self._scorer = scorer if scorer is not None else ModelPromptScorer.of_engine(engine)

    def set_serving(self, serving: bool) -> None:
        """False while draining for shutdown: Health answers NOT_SERVING."""
        self._serving = serving

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, kind = _error_status(exc)
        details = str(exc) or type(exc).__name__
        if code is grpc.StatusCode.INTERNAL:
            details = f"internal error: {type(exc).__name__}: {exc}"
        await context.abort(code, details, trailing_metadata=((ERROR_KEY, kind),))

    def _to_engine_request(self, request: edge_pb2.GenerateRequest) -> GenerationRequest:
        """Raises ValueError for a malformed request."""
        params = sampling_from_proto(request.sampling)
        kind = request.WhichOneof("input")
        if kind == "prompt":
            prompt_ids = self._engine.encode_prompt(request.prompt)
        elif kind == "chat":
            if not request.chat.messages:
                raise ValueError("chat must hold at least one message")
            messages = []
            for m in request.chat.messages:
                role = _ROLES.get(m.role)
                if role is None:
                    raise ValueError(f"chat message role must be set (got {m.role})")
                messages.append(ChatMessage(role=role, content=m.content))  # type: ignore[arg-type]
            prompt_ids = self._engine.encode_chat(messages)
        elif kind == "token_ids":
            prompt_ids = tuple(request.token_ids.ids)
        else:
            raise ValueError("one of prompt, chat or token_ids is required")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        return GenerationRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=tuple(prompt_ids),
            params=params,
        )

    async def Generate(
        self, request: edge_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        error: Exception | None = None
        try:
            engine_request = self._to_engine_request(request)
        except Exception as exc:
            if not isinstance(exc, ValueError):
                log.exception("tokenizing request %s failed", request.request_id)
            error = exc
        if error is not None:
            await self._abort(context, error)
            return
        stream: AsyncIterator[GenerationChunk] | None = None
        try:
            # generate() may raise right away or on the first __anext__; both are handled.
            stream = self._engine.generate(engine_request)
            text = _score_text(request) if request.score_prompt else None
            if text and self._scorer is not None:
                scorer = self._scorer
                score = asyncio.ensure_future(
                    asyncio.to_thread(lambda: scorer.score(text).as_dict())
                )
                # A stream that ends early never awaits it: retrieve its outcome anyway.
                score.add_done_callback(lambda f: f.cancelled() or f.exception())
                stream = _with_prompt_score(stream, score)
            if request.whole_answer:
                chunks = [chunk async for chunk in stream]
                if chunks:
                    await context.write(chunks_to_proto(chunks))
            else:
                await write_coalesced(stream, context)
        except (ValueError, EngineOverloaded) as exc:
            error = exc
        except Exception as exc:
            log.exception("generate %s failed", engine_request.request_id)
            error = exc
        finally:
            # Runs on normal end, on error, and on cancellation (CancelledError thrown in at
            # an await): the engine frees the KV.
            if stream is not None:
                await _aclose(stream)
        if error is not None:
            await self._abort(context, error)

    async def Mix(
        self,
        request_iterator: AsyncIterator[edge_pb2.MixRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Forced-token stepping (see edge.proto): the engine's `open_forced` session, one
        `next` per position, the caller's token back, its chunk out."""
        open_forced = getattr(self._engine, "open_forced", None)
        error: BaseException | None = None
        session = None
        first = None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("step") != "start":
                raise ValueError("the first Mix message must be `start`")
            engine_request = self._to_engine_request(first.start.request)
            if open_forced is None:
                raise NotImplementedError(f"{type(self._engine).__name__} cannot step")
            session = open_forced(engine_request, first.start.top_k)
            while True:
                item = await session.next()
                if isinstance(item, GenerationChunk):
                    await context.write(edge_pb2.MixReply(chunk=chunk_to_proto(item)))
                    if item.finish_reason is not None:
                        break
                    continue
                await context.write(
                    edge_pb2.MixReply(
                        next=edge_pb2.NextTokenLogprobs(
                            token_ids=item.token_ids,
                            logprobs=item.logprobs,
                            position=item.position,
                            prompt_tokens=item.prompt_tokens,
                        )
                    )
                )
                msg = await anext(aiter(request_iterator), None)
                if msg is None:  # the caller is done: abort
                    break
                if msg.WhichOneof("step") != "token":
                    raise ValueError("after `start`, every Mix message must be a `token`")
                session.choose(msg.token)
        except NotImplementedError as exc:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                str(exc),
                trailing_metadata=((ERROR_KEY, "internal"),),
            )
        except (ValueError, EngineOverloaded) as exc:
            error = exc
        except Exception as exc:
            log.exception("mix %s failed", first.start.request.request_id if first else "?")
            error = exc
        finally:
            if session is not None:
                session.close()
        if error is not None:
            await self._abort(context, error)

    async def Health(
        self, request: edge_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> edge_pb2.HealthReply:
        status = (
            edge_pb2.HealthReply.STATUS_SERVING
            if self._serving
            else edge_pb2.HealthReply.STATUS_NOT_SERVING
        )
        return edge_pb2.HealthReply(status=status, queue_depth=self._engine.queue_depth())

    async def Info(
        self, request: edge_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> edge_pb2.InfoReply:
        return edge_pb2.InfoReply(
            model_id=self._engine.model_id,
            n_layers=self._engine.n_layers,
            max_context=self._engine.max_context,
            queue_depth=self._engine.queue_depth(),
        )


@dataclass(frozen=True)
class RunningGrpcServer:
    """A started server, the port it bound (useful with port 0) and its servicer."""

    server: grpc.aio.Server
    port: int
    servicer: EdgeServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let running streams finish for `grace` seconds, then cancel
        the rest (which closes their engine iterators)."""
        self.servicer.set_serving(False)
        await self.server.stop(grace)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # bare IPv6 literal
    return f"{host}:{port}"


async def start_grpc_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    options: list[tuple[str, int | str]] | None = None,
    tls: TlsConfig | None = None,
) -> RunningGrpcServer:
    """Serve `engine` on host:port (0 picks a free port) and return once listening; over
    TLS with `tls` (see tandem.transport.grpc_tls), else plaintext."""
    servicer = EdgeServicer(engine)
    health = f"/{edge_pb2.DESCRIPTOR.package}.EdgeNode/Health"  # probes carry no token
    auth = [BearerAuth(token, exempt=frozenset({health}))] if token else []
    # bounded: the engine's admission queue refuses first; this caps idle streams too
    server = grpc.aio.server(
        interceptors=auth, options=options, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
    )
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(servicer, server)
    address = _address(host, port)
    try:
        bound = add_port(server, address, tls)
    except RuntimeError as exc:
        raise OSError(f"gRPC server could not bind {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"gRPC server could not bind {address}")
    await server.start()
    log.info(
        "edge gRPC server listening on %s (%s)",
        _address(host, bound),
        "TLS" if tls else "plaintext",
    )
    return RunningGrpcServer(server=server, port=bound, servicer=servicer)
