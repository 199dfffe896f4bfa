"""One validated OpenAI request, ready for the engine."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tandem.runtime.engine_api import ChatMessage, GenerationRequest


@dataclass(frozen=True)
class Job:
    """A validated request, ready for the engine."""

    id: str
    created: int
    request: GenerationRequest
    prompt_param: str
    max_tokens: int
    stream: bool
    include_usage: bool


def with_source(
    job: Job,
    *,
    prompt_text: str | None = None,
    chat_messages: tuple[ChatMessage, ...] | None = None,
) -> Job:
    """Attach the original input to the engine request (for engines that forward text)."""
    request = replace(job.request, prompt_text=prompt_text, chat_messages=chat_messages)
    return replace(job, request=request)
