"""The edge engine: continuous batching of requests on one model, with early exit.

A worker thread owns the model. Each loop it takes new requests and aborts from
thread-safe queues, admits waiting requests up to `max_batch`, prefills prompt chunks
within a token budget (chunked prefill), then runs one batched decode step for every
sequence whose prompt is in. Output goes back to each request's asyncio
queue. Closing a request's iterator (client gone) aborts it and frees its KV.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tandem.runtime.decoder import ExitDecoder, SequenceState, StepResult
from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from tandem.runtime.generate import pick
from tandem.runtime.sampling import Sampler
from tandem.runtime.stop import StopMatcher

log = logging.getLogger(__name__)


class Codec(Protocol):
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # sequences decoded together
    max_waiting: int = 64  # admitted but not yet running; beyond this: EngineOverloaded
    max_prefill_tokens: int = 512  # prompt tokens per loop; longer prompts go in chunks
    max_context: int = 4096
    tau: float = 1.0  # early-exit confidence threshold; 1.0 = always full depth
    max_deferred: int = 32


@dataclass
class _Active:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    sampler: Sampler
    stop: StopMatcher
    seq: SequenceState | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    ids: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)


class _Abort:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class EdgeEngine:
    """Implements tandem.runtime.engine_api.Engine."""

    def __init__(
        self, model_id: str, decoder: ExitDecoder, codec: Codec, config: EngineConfig
    ) -> None:
        self.model_id = model_id
        self.decoder = decoder
        self.codec = codec
        self.config = config
        self.max_context = min(config.max_context, decoder.model.max_context)
        self.n_layers = decoder.n_layers
        self._inbox: queue.SimpleQueue[_Active | _Abort | None] = queue.SimpleQueue()
        self._waiting: list[_Active] = []
        self._running: list[_Active] = []
        self._submitted = 0  # in the inbox or waiting; guarded by _lock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edge-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # -- Engine protocol -------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.codec.encode(prompt))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        try:
            return tuple(self.codec.encode_chat(messages))
        except Exception as exc:  # jinja TemplateError and friends: the client's input
            raise ValueError(f"chat template failed: {exc}") from exc

    def queue_depth(self) -> int:
        with self._lock:
            return self._submitted

    def running(self) -> int:
        return len(self._running)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ValueError("prompt is empty")
        if n_prompt + request.params.max_tokens > self.max_context:
            raise PromptTooLong(
                f"prompt ({n_prompt} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the context of {self.max_context} tokens"
            )
        if self._thread is None:
            raise RuntimeError("engine not started")
        with self._lock:
            if self._submitted >= self.config.max_waiting:
                raise EngineOverloaded(f"{self._submitted} requests are waiting")
            self._submitted += 1
        active = _Active(
            request=request,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            sampler=Sampler(request.params),
            stop=StopMatcher(request.params.stop),
        )
        self._inbox.put(active)
        finished = False
        try:
            while True:
                item = await active.out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(_Abort(request.request_id))

    # -- worker thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            idle = not self._running and not self._waiting
            if not self._drain_inbox(block=idle):
                for a in self._running + self._waiting:  # shutting down: nobody waits forever
                    self._send(a, RuntimeError("the engine is shutting down"))
                self._running, self._waiting = [], []
                break
            try:
                self._admit()
                self._prefill()
                self._step()
            except Exception as exc:  # a bug or OOM: fail the affected requests, keep serving
                log.exception("engine step failed")
                for a in self._running:
                    self._send(a, RuntimeError(f"engine error: {exc}"))
                self._running.clear()

    def _drain_inbox(self, block: bool) -> bool:
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, _Abort):
                self._abort(item.request_id)
            else:
                self._waiting.append(item)

    def _abort(self, request_id: str) -> None:
        for group in (self._waiting, self._running):
            for a in group:
                if a.request.request_id == request_id:
                    group.remove(a)
                    a.seq = None  # drops the KV cache
                    if group is self._waiting:
                        with self._lock:
                            self._submitted -= 1
                    return

    def _admit(self) -> None:
        """Move waiting requests into the running batch, up to max_batch."""
        n = min(len(self._waiting), self.config.max_batch - len(self._running))
        if n <= 0:
            return
        admitted, self._waiting = self._waiting[:n], self._waiting[n:]
        with self._lock:
            self._submitted -= n
        for a in admitted:
            a.seq = self.decoder.new_sequence()
        self._running.extend(admitted)

    def _prefill(self) -> None:
        """Prefill prompt chunks within the per-loop token budget (chunked prefill keeps
        running sequences decoding while a long prompt comes in). A sequence whose prompt
        is complete samples its first token."""
        budget = self.config.max_prefill_tokens
        batch, chunks = [], []
        for a in self._running:
            if a.decoding or budget <= 0:
                continue
            prompt = a.request.prompt_ids
            chunk = list(prompt[a.prefilled : a.prefilled + budget])
            budget -= len(chunk)
            batch.append(a)
            chunks.append(chunk)
        if not batch:
            return
        steps = self.decoder.prefill([a.seq for a in batch], chunks)
        for a, chunk, step in zip(batch, chunks, steps, strict=True):
            a.prefilled += len(chunk)
            if a.decoding:
                self._emit(a, step)
        self._running = [a for a in self._running if not a.done]

    def _step(self) -> None:
        ready = [a for a in self._running if a.decoding and a.ids]
        if not ready:
            return
        steps = self.decoder.decode(
            [a.seq for a in ready], [a.ids[-1] for a in ready], self.config.tau
        )
        for a, step in zip(ready, steps, strict=True):
            self._emit(a, step)
        self._running = [a for a in self._running if not a.done]

    def _emit(self, a: _Active, step: StepResult) -> None:
        token, _ = pick(a.sampler, step)
        a.ids.append(token)
        params = a.request.params
        finish: FinishReason | None = None
        is_eos = token in self.codec.eos_ids and not params.ignore_eos
        if is_eos:
            finish = "stop"
            text = a.stop.flush()
        else:
            text, hit = a.stop.feed(self.codec.decode(a.ids))
            if hit:
                finish = "stop"
            elif len(a.ids) >= params.max_tokens or (
                len(a.request.prompt_ids) + len(a.ids) >= self.max_context
            ):
                finish = "length"
                text += a.stop.flush()
        if finish is not None:
            a.done = True
            a.seq = None
        self._send(
            a,
            GenerationChunk(
                text=text,
                token_ids=(token,),
                exit_layers=(step.exit_layer,),
                prompt_tokens=len(a.request.prompt_ids),
                completion_tokens=len(a.ids),
                finish_reason=finish,
            ),
        )

    @staticmethod
    def _send(a: _Active, item: GenerationChunk | BaseException) -> None:
        try:
            a.loop.call_soon_threadsafe(a.out.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            a.done = True
