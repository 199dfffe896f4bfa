"""A hand-written fake `Engine` for front-end tests: deterministic, no model, no torch work.

Tokens are the bytes of the prompt (so `len(prompt_ids) == len(prompt.encode())`); the reply
is a fixed text split into word tokens. It honours max_tokens and stop strings, reports exit
layers from a repeating pattern, and can be told to raise before or during generation or to
block after some chunks. It records which requests were aborted (iterator closed early).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

import anyio

from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)

DEFAULT_REPLY = "Hello there! The edge says hi. Goodbye now."


class FakeEngine:
    def __init__(
        self,
        reply: str = DEFAULT_REPLY,
        *,
        model_id: str = "fake-model",
        max_context: int = 512,
        n_layers: int = 4,
        exit_pattern: Sequence[int] = (2, 4, 4, 3),
        overloaded: bool = False,
        fail_after: int | None = None,
        block_after: int | None = None,
        token_delay_s: float = 0.0,
        queue_depth: int = 0,
    ) -> None:
        self.model_id = model_id
        self.max_context = max_context
        self.n_layers = n_layers
        self.reply = reply
        self.exit_pattern = tuple(exit_pattern)
        self.overloaded = overloaded
        self.fail_after = fail_after
        self.block_after = block_after
        self.token_delay_s = token_delay_s
        self._queue_depth = queue_depth
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.blocked = anyio.Event()  # set when a request reaches block_after

    # -- Engine -----------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(prompt.encode("utf-8"))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return self.encode_prompt(text)

    def queue_depth(self) -> int:
        return self._queue_depth

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._generate(request)

    # -- internals --------------------------------------------------------------------

    def pieces(self, max_tokens: int, stop: Sequence[str]) -> tuple[list[str], str]:
        """The text of each token this engine will emit, and the finish reason."""
        tokens = re.findall(r"\S+\s*", self.reply)
        cut = min((i for i in (self.reply.find(s) for s in stop) if i >= 0), default=-1)
        out: list[str] = []
        pos = 0
        for tok in tokens:
            if len(out) == max_tokens:
                return out, "length"
            if cut >= 0 and pos + len(tok) > cut:
                if cut > pos:
                    out.append(tok[: cut - pos])
                return out, "stop"
            out.append(tok)
            pos += len(tok)
        return out, "stop"

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        if self.overloaded:
            raise EngineOverloaded("queue full")
        n_prompt = len(request.prompt_ids)
        if n_prompt + request.params.max_tokens > self.max_context:
            raise PromptTooLong(f"{n_prompt} + {request.params.max_tokens} > {self.max_context}")
        texts, reason = self.pieces(request.params.max_tokens, request.params.stop)
        done = False
        try:
            for i, text in enumerate(texts):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("fake engine failure")
                if self.block_after is not None and i == self.block_after:
                    self.blocked.set()
                    await anyio.sleep_forever()
                await anyio.sleep(self.token_delay_s)
                last = i == len(texts) - 1
                yield GenerationChunk(
                    text=text,
                    token_ids=(1000 + i,),
                    exit_layers=(self.exit_pattern[i % len(self.exit_pattern)],),
                    prompt_tokens=n_prompt,
                    completion_tokens=i + 1,
                    finish_reason=reason if last else None,  # type: ignore[arg-type]
                )
            if not texts:
                yield GenerationChunk("", (), (), n_prompt, 0, reason)  # type: ignore[arg-type]
            done = True
            self.finished.append(request.request_id)
        finally:
            if not done:
                self.aborted.append(request.request_id)
