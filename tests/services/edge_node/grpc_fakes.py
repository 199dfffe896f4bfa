"""A hand-written fake `Engine` for the gRPC front-end tests (no model, no torch math)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    TokenSource,
)


class FakeEngine:
    """Tokens are characters (token id = code point); token i decodes to `word{i} `.

    The exit layer of token i is 2 when i is odd, else `n_layers`. `hang_after` makes the
    stream block forever after that many tokens (to test cancellation); `overloaded` makes
    `generate` raise EngineOverloaded before the first chunk; `fail_after` raises a
    RuntimeError after that many tokens. From token `burst_after` on, chunks come without
    yielding to the event loop in between (as from an engine queue with a backlog), so a
    front end sees them all ready at once. `sources` (cycled) labels the tokens' sources.
    `plain_iterator` returns a hand-written iterator (not an async generator) whose `aclose`
    only runs if the front end calls it.
    """

    model_id = "fake-model"
    max_context = 64
    n_layers = 4

    def __init__(
        self,
        *,
        overloaded: bool = False,
        hang_after: int | None = None,
        fail_after: int | None = None,
        depth: int = 0,
        plain_iterator: bool = False,
        burst_after: int | None = None,
        sources: Sequence[TokenSource] = (),
    ) -> None:
        self.overloaded = overloaded
        self.hang_after = hang_after
        self.fail_after = fail_after
        self.depth = depth
        self.plain_iterator = plain_iterator
        self.burst_after = burst_after
        self.sources = tuple(sources)
        self.requests: list[GenerationRequest] = []
        self.chats: list[tuple[ChatMessage, ...]] = []
        self.started = asyncio.Event()
        self.closed = asyncio.Event()  # the stream's finally ran
        self.completed = False  # the stream ran to its natural end

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(ord(c) for c in prompt)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        self.chats.append(tuple(messages))
        return self.encode_prompt("".join(f"<{m.role}>{m.content}" for m in messages))

    def queue_depth(self) -> int:
        return self.depth

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        if self.overloaded:
            raise EngineOverloaded("queue full")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_context:
            raise PromptTooLong(
                f"{len(request.prompt_ids)} prompt tokens + {request.params.max_tokens} "
                f"> {self.max_context}"
            )
        if self.plain_iterator:
            return _HangingStream(self, request)
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        n_prompt = len(request.prompt_ids)
        self.started.set()
        try:
            n = request.params.max_tokens
            for i in range(n):
                if self.hang_after is not None and i >= self.hang_after:
                    await asyncio.Event().wait()
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("kernel exploded")
                if self.burst_after is None or i < self.burst_after:
                    await asyncio.sleep(0)
                yield GenerationChunk(
                    text=f"word{i} ",
                    token_ids=(100 + i,),
                    exit_layers=(2 if i % 2 else self.n_layers,),
                    prompt_tokens=n_prompt,
                    completion_tokens=i + 1,
                    finish_reason="length" if i == n - 1 else None,
                    sources=(self.sources[i % len(self.sources)],) if self.sources else (),
                )
            self.completed = True
        finally:
            self.closed.set()


class _HangingStream:
    """Yields one chunk, then blocks; unlike an async generator, cancelling a pending
    `__anext__` does not finalize it: only `aclose()` does."""

    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self.sent = 0

    def __aiter__(self) -> _HangingStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        self.engine.started.set()
        if self.sent == 0:
            self.sent = 1
            return GenerationChunk("word0 ", (100,), (4,), len(self.request.prompt_ids), 1)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.engine.closed.set()
