"""The boundary between a serving front end (HTTP, gRPC) and a generation engine.

Front ends depend only on this module; the edge engine, the cloud context manager and
test fakes implement `Engine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tandem.runtime.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
# Who produced a token: the edge (an exit, or full depth on a standalone model), the cloud
# (collaborative mode), or the edge because the cloud was unreachable or too slow.
TokenSource = Literal["edge", "cloud", "fallback"]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """`prompt_text` / `chat_messages` optionally carry the input `prompt_ids` were encoded
    from, for engines that forward text rather than token ids (the router's experts)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    prompt_text: str | None = None
    chat_messages: tuple[ChatMessage, ...] | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """One step of output for one request.

    `text` is the new text since the previous chunk, with stop strings already cut.
    `exit_layers` holds, per new token, the layer count that produced it (== n_layers
    for full depth) and `sources` who produced it. The last chunk carries `finish_reason`.
    `report` (JSON-ready, from engines that wrap others such as the router's) is merged into
    the response's `usage.tandem`; the last chunk that carries one wins.
    """

    text: str
    token_ids: tuple[int, ...]
    exit_layers: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    sources: tuple[TokenSource, ...] = ()
    report: Mapping[str, Any] | None = None


class EngineOverloaded(Exception):
    """The engine's admission queue is full; the client should retry later."""


class PromptTooLong(ValueError):
    """prompt tokens + max_tokens exceed the model context."""


class Engine(Protocol):
    """What a front end needs from a model engine."""

    model_id: str
    max_context: int
    n_layers: int

    def encode_prompt(self, prompt: str) -> tuple[int, ...]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks. Closing the iterator early (client gone) aborts the request
        and frees its KV. Raises PromptTooLong or EngineOverloaded before the first chunk."""
        ...

    def queue_depth(self) -> int: ...
