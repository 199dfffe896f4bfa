"""`ExpertEngine`: one edge expert, seen through the `Engine` protocol.

The router has no tokenizer. `encode_prompt` / `encode_chat` return a placeholder of an
estimated length (the UTF-8 byte count, plus a per-message allowance for chat templates):
an upper bound for byte-level BPE tokenizers, so the front end's context-length checks and
its default `max_tokens` stay on the safe side. The exact check is the edge node's.

`generate` forwards the request's original text (`GenerationRequest.prompt_text` or
`chat_messages`) to the least-loaded healthy replica over gRPC, failing over to another
replica only before the first chunk (`ReplicaTable.stream_with_failover`). The replica that
served the request is written to the `served` context holder, if one is set, so the front
end can report it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from services.router.replicas import (
    EDGE_CHANNEL_OPTIONS,
    NoHealthyReplica,
    Replica,
    ReplicaTable,
    is_retryable_elsewhere,
)
from services.router.token_mixture import GrpcMixStream
from tandem.clients.edge import EdgeClient
from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
)
from tandem.transport.grpc_tls import TlsConfig, aio_channel
from tandem_proto.edge.v1 import edge_pb2_grpc

# Per-message allowance (in tokens) for chat template markup, and for the generation prompt.
CHAT_TOKENS_PER_MESSAGE = 16
CHAT_TOKENS_EXTRA = 16

# A mutable holder set by the front end per request; ExpertEngine fills in "replica".
served: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tandem_router_served", default=None
)
# True while the router collects a whole answer (the client does not stream): the edge node
# may then send it in one message at the end instead of as it is produced.
whole_answer: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tandem_router_whole_answer", default=False
)


# True while the router collects answers it picks among by the experts' prompt scores
# (self_score.SelfScoreTop1): the edge node then returns its PromptScore on the last chunk.
score_prompt: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tandem_router_score_prompt", default=False
)


class ExpertUnavailable(EngineOverloaded):
    """No healthy replica of the expert could take the request; retry shortly."""

    retry_after = 1


class RemoteExpert:
    """What every remote expert engine shares: the Engine protocol's bookkeeping (placeholder
    token counts, queue depth from the replica table) and the need for the request's text.
    Subclasses implement `_generate`."""

    def __init__(
        self,
        expert_id: str,
        table: ReplicaTable,
        *,
        max_context: int,
        n_layers: int = 1,
        attempts: int = 2,
        timeout_s: float | None = None,
    ) -> None:
        self.model_id = expert_id
        self.expert_id = expert_id
        self.table = table
        self.max_context = max_context
        self.n_layers = n_layers
        self.attempts = attempts
        self.timeout_s = timeout_s

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        return (0,) * len(prompt.encode("utf-8"))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        n = sum(len(m.content.encode("utf-8")) + CHAT_TOKENS_PER_MESSAGE for m in messages)
        return (0,) * (n + CHAT_TOKENS_EXTRA)

    def queue_depth(self) -> int:
        return sum(s.queue_depth + s.in_flight for s in self.table.statuses(self.expert_id))

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.prompt_text is None and request.chat_messages is None:
            raise ValueError(
                f"{type(self).__name__} needs the request's prompt_text or chat_messages"
            )
        return self._generate(request)

    def _open(self, request: GenerationRequest, replica: Replica) -> AsyncIterator[GenerationChunk]:
        """Start the generation on one replica (and note the replica in `served`)."""
        raise NotImplementedError

    def _broken_stream(self, exc: Exception) -> Exception | None:
        """The error to raise instead of `exc` when a stream breaks after its first chunk
        (None: raise `exc` itself)."""
        return None

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The least-loaded healthy replica; another one if it fails before its first chunk
        (`ReplicaTable.stream_with_failover`); ExpertUnavailable (429) when none could."""
        stream = self.table.stream_with_failover(
            self.expert_id, lambda r: self._open(request, r), attempts=self.attempts
        )
        async with contextlib.aclosing(stream):
            try:
                first = await anext(stream, None)
            except NoHealthyReplica as exc:
                cause = f" (last error: {exc.__cause__})" if exc.__cause__ else ""
                raise ExpertUnavailable(f"{exc}{cause}") from exc
            except Exception as exc:
                if isinstance(exc, EngineOverloaded) or not is_retryable_elsewhere(exc):
                    raise
                raise ExpertUnavailable(  # every replica tried failed
                    f"expert {self.expert_id!r} is unavailable: {exc}"
                ) from exc
            if first is None:
                return
            yield first
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:
                mapped = self._broken_stream(exc)
                if mapped is None:
                    raise
                raise mapped from exc


class ExpertEngine(RemoteExpert):
    """Forward generation for one edge expert to its replicas. Create it anywhere; gRPC
    channels open lazily on the event loop that first uses them. `close()` closes them."""

    def __init__(
        self, expert_id: str, table: ReplicaTable, *, tls: TlsConfig | None = None, **kwargs: Any
    ) -> None:
        super().__init__(expert_id, table, **kwargs)
        self.tls = tls  # TLS to the edge replicas (None: plaintext)
        self._clients: dict[str, EdgeClient] = {}
        self._mix_channels: dict[str, grpc.aio.Channel] = {}

    # -- internals -----------------------------------------------------------------------

    def _client(self, replica: Replica) -> EdgeClient:
        client = self._clients.get(replica.address)
        if client is None:
            client = EdgeClient(
                replica.address, token=replica.token, options=EDGE_CHANNEL_OPTIONS, tls=self.tls
            )
            self._clients[replica.address] = client
        return client

    def _open(self, request: GenerationRequest, replica: Replica) -> AsyncIterator[GenerationChunk]:
        holder = served.get()
        if holder is not None:
            holder["replica"] = replica.address
        return self._client(replica).generate(
            prompt=request.prompt_text,
            messages=request.chat_messages,
            params=request.params,
            request_id=request.request_id,
            timeout=self.timeout_s,
            whole_answer=whole_answer.get(),
            score_prompt=score_prompt.get(),
        )

    def open_mix(self, request: GenerationRequest, top_k: int) -> GrpcMixStream:
        """A forced-token stream (services.router.token_mixture) on the least-loaded
        healthy replica."""
        replica = self.table.pick(self.expert_id)
        channel = self._mix_channels.get(replica.address)
        if channel is None:
            channel = aio_channel(replica.address, self.tls, EDGE_CHANNEL_OPTIONS)
            self._mix_channels[replica.address] = channel
        return GrpcMixStream(
            edge_pb2_grpc.EdgeNodeStub(channel),
            prompt=request.prompt_text,
            messages=request.chat_messages,
            params=request.params,
            top_k=top_k,
            request_id=request.request_id,
            metadata=(("authorization", f"Bearer {replica.token}"),) if replica.token else (),
            timeout=self.timeout_s,
        )

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()
        channels, self._mix_channels = self._mix_channels, {}
        for channel in channels.values():
            await channel.close()
