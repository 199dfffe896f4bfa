"""The response bodies and SSE events of /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from tandem.api.job import Job
from tandem.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from tandem.api.sse import sse_event


class Format:
    """Builds the bodies and SSE events of one endpoint."""

    def __init__(self, job: Job, model: str) -> None:
        self.job = job
        self.model = model

    def _usage_exclude(self) -> set[str] | None:
        return None if self.job.include_usage else {"usage"}

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        raise NotImplementedError

    def start_event(self) -> bytes:
        return b""

    def text_event(self, text: str) -> bytes:
        raise NotImplementedError

    def finish_event(self, finish_reason: str) -> bytes:
        raise NotImplementedError

    def usage_event(self, usage: Usage) -> bytes:
        raise NotImplementedError


class CompletionFormat(Format):
    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        j = self.job
        return CompletionResponse(
            id=j.id, created=j.created, model=self.model, choices=choices, usage=usage
        )

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return self._body([choice], usage).model_dump(mode="json")

    def text_event(self, text: str) -> bytes:
        choice = CompletionChoice(text=text, finish_reason=None)
        return sse_event(self._body([choice], None), exclude=self._usage_exclude())

    def finish_event(self, finish_reason: str) -> bytes:
        choice = CompletionChoice(text="", finish_reason=finish_reason)
        return sse_event(self._body([choice], None), exclude=self._usage_exclude())

    def usage_event(self, usage: Usage) -> bytes:
        return sse_event(self._body([], usage))


class ChatFormat(Format):
    def _chunk(self, delta: DeltaMessage, finish_reason: str | None = None) -> bytes:
        j = self.job
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=j.id, created=j.created, model=self.model, choices=[choice])
        return sse_event(chunk, exclude=self._usage_exclude())

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        j = self.job
        choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish_reason)
        body = ChatCompletionResponse(
            id=j.id, created=j.created, model=self.model, choices=[choice], usage=usage
        )
        return body.model_dump(mode="json")

    def start_event(self) -> bytes:
        return self._chunk(DeltaMessage(role="assistant", content=""))

    def text_event(self, text: str) -> bytes:
        return self._chunk(DeltaMessage(content=text))

    def finish_event(self, finish_reason: str) -> bytes:
        return self._chunk(DeltaMessage(), finish_reason)

    def usage_event(self, usage: Usage) -> bytes:
        j = self.job
        chunk = ChatCompletionChunk(id=j.id, created=j.created, model=self.model, choices=[])
        chunk.usage = usage
        return sse_event(chunk)
