"""The edge engine: continuous batching of requests on one model, with early exit.

A worker thread owns the model. Each loop it takes new requests and aborts from
thread-safe queues, admits waiting requests up to `max_batch`, prefills prompt chunks
within a token budget (chunked prefill), then runs one batched decode step for every
sequence whose prompt is in. Output goes back to each request's asyncio
queue. Closing a request's iterator (client gone) aborts it and frees its KV.

Collaborative mode (CE-CoLLM): the decoder runs layers [0, split) only and a `CloudLink`
is given. Split-layer states of every position go to the cloud as they are computed; a
token that no edge exit is confident about (latency-aware tau, see `tau_policy`) is asked
of the cloud, all such tokens of one step in parallel. When the cloud is unreachable or
slower than its timeout, the edge's own token from the split head is used instead
(`source == "fallback"`).

Speculative collaboration (`EngineConfig.collab == "speculative"`, lossless): a confident
token is a draft. The engine keeps decoding on it and holds it back from the client; the
draft rides to the cloud with its position's state, and the cloud judges it as it runs
its layers on the upload. Verdicts arrive asynchronously (`CloudLink.verdict`): accepted
drafts are emitted; a rejected one rolls the sequence back to its position (exactly:
`SequenceState.truncate`) and the cloud's token replaces it. The engine blocks only on an
unconfident token, and to flush its drafts at the end of a sequence or when
`max_drafts` are outstanding. Greedy output equals cloud-only greedy at every tau;
sampled output has the cloud's distribution (speculative-sampling acceptance).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from services.edge_node.cloud_link import CloudLink, CloudUnavailable
from services.edge_node.tau_policy import TauPolicy
from tandem.energy.meter import EnergyMeter
from tandem.runtime.decoder import ExitDecoder, SequenceState, StepResult
from tandem.runtime.detokenizer import IncrementalDetokenizer
from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    TokenSource,
)
from tandem.runtime.generate import pick
from tandem.runtime.sampling import Sampler
from tandem.runtime.speculative import Verdict, make_draft
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
    # Emulated slower device (benchmarks): every model step takes `slowdown` times its
    # measured time (the engine sleeps the difference). 1.0 = the real speed.
    slowdown: float = 1.0
    # Collaborative mode: "final" (CE-CoLLM: a confident edge token is final) or
    # "speculative" (it is a draft the cloud checks; output equals cloud-only).
    collab: Literal["final", "speculative"] = "final"
    max_drafts: int = 16  # speculative: drafts outstanding before the engine waits


@dataclass
class EngineStats:
    """Totals since start (read by benchmarks and metrics)."""

    model_s: float = 0.0  # edge model time, emulated slowdown included
    cloud_wait_s: float = 0.0  # time the engine waited for cloud answers
    steps: int = 0
    energy_j: float = 0.0  # energy of the model steps (EdgeEngine.meter), shared out to requests


@dataclass
class _Active:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    sampler: Sampler
    stop: StopMatcher
    detok: IncrementalDetokenizer  # the output's text, a few tokens of decode per token
    seq: SequenceState | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    ids: list[int] = field(default_factory=list)  # generated: emitted, then drafts
    meta: list[tuple[int, TokenSource]] = field(default_factory=list)  # exit layer, source
    emitted: int = 0  # ids sent to the client; the rest are unverified drafts
    epoch: int = 0  # speculative: rollbacks seen
    done: bool = False
    # Forced stepping (`open_forced`): the top-k of each next-token distribution goes to the
    # client, which sends back the token to append; None: the engine samples.
    top_k: int | None = None
    awaiting: bool = False  # forced: waiting for the client's token
    energy_j: float = 0.0  # this request's share of its steps' energy (EdgeEngine.meter)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)


class _Abort:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class _Force:
    def __init__(self, request_id: str, token: int) -> None:
        self.request_id = request_id
        self.token = token


@dataclass(frozen=True)
class TopLogprobs:
    """A forced sequence's next-token distribution: the top-k ids, most likely first, and
    their log-probabilities under the full softmax."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    position: int  # completion tokens before this one
    prompt_tokens: int


def top_logprobs(step: StepResult, k: int, position: int, prompt_tokens: int) -> TopLogprobs:
    logp = torch.log_softmax(step.logits.float().reshape(-1), dim=-1)
    k = logp.numel() if k <= 0 else min(k, logp.numel())
    values, idx = logp.topk(k)
    if step.shortlist is not None:
        idx = step.shortlist[idx]
    return TopLogprobs(tuple(idx.tolist()), tuple(values.tolist()), position, prompt_tokens)


class ForcedSession:
    """One request stepped by its caller (`EdgeEngine.open_forced`): `next()` gives the next
    item, a `TopLogprobs` (choose a token with `choose`) or the `GenerationChunk` of the token
    chosen last (its `finish_reason` ends the session); `close()` aborts it if unfinished."""

    def __init__(self, engine: EdgeEngine, active: _Active) -> None:
        self._engine = engine
        self._active = active
        self.finished = False

    async def next(self) -> TopLogprobs | GenerationChunk:
        item = await self._active.out.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if isinstance(item, GenerationChunk) and item.finish_reason is not None:
            self.finished = True
        return item

    def choose(self, token: int) -> None:
        if token < 0 or token >= self._engine.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary")
        self._engine._inbox.put(_Force(self._active.request.request_id, token))

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._inbox.put(_Abort(self._active.request.request_id))


class EdgeEngine:
    """Implements tandem.runtime.engine_api.Engine."""

    def __init__(
        self,
        model_id: str,
        decoder: ExitDecoder,
        codec: Codec,
        config: EngineConfig,
        cloud: CloudLink | None = None,
        tau_policy: TauPolicy | None = None,
        meter: EnergyMeter | None = None,
    ) -> None:
        if decoder.split and cloud is None:
            log.warning("split decoder without a cloud link: edge-standalone mode")
        self.speculative = config.collab == "speculative" and cloud is not None
        if self.speculative and (not decoder.split or decoder.heads):
            raise ValueError(
                "speculative collaboration needs a split decoder without exits before the split"
            )
        self.model_id = model_id
        self.decoder = decoder
        self.codec = codec
        self.config = config
        self.cloud = cloud if decoder.split else None
        self.tau_policy = tau_policy or TauPolicy(config.tau, min(config.tau, 0.5))
        self.tau_now = config.tau  # the latency-aware threshold of the last step
        self.stats = EngineStats()
        # Each model step's energy (tandem.energy: measured where the hardware reports it,
        # else modelled) is split equally among the step's requests; the last chunk reports
        # a request's total in usage (energy_joules, energy_source).
        self.meter = meter
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
        active = self._submit(request)
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

    @property
    def vocab_size(self) -> int:
        return int(self.decoder.model.lm_head.weight.shape[0])

    def open_forced(self, request: GenerationRequest, top_k: int) -> ForcedSession:
        """Start `request` in forced mode (token-level mixing): the engine prefills it and
        then, at every position, hands the caller the top-k log-probabilities (full depth)
        and waits for the token to append. Same admission and limits as `generate`."""
        if self.decoder.split:
            raise NotImplementedError("forced stepping needs a full-depth (non-split) decoder")
        return ForcedSession(self, self._submit(request, top_k=max(0, top_k)))

    def _submit(self, request: GenerationRequest, top_k: int | None = None) -> _Active:
        """Check the request against the limits, count it as waiting and hand it to the
        worker thread (called on the client's event loop)."""
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
            detok=IncrementalDetokenizer(self.codec.decode),
            top_k=top_k,
        )
        self._inbox.put(active)
        return active

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
            elif isinstance(item, _Force):
                self._force(item)
            else:
                self._waiting.append(item)

    def _force(self, item: _Force) -> None:
        """Append a forced sequence's chosen token (the next decode step runs on it)."""
        for a in self._running:
            if a.request.request_id == item.request_id and a.awaiting:
                a.awaiting = False
                self._emit(a, item.token, self.n_layers, "edge")
                if a.done:
                    self._running.remove(a)
                return

    def _abort(self, request_id: str) -> None:
        for group in (self._waiting, self._running):
            for a in group:
                if a.request.request_id == request_id:
                    group.remove(a)
                    a.seq = None  # drops the KV cache
                    self._release_cloud(a)
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
            if self.speculative:
                self.cloud.speculate(a.request.request_id, a.request.params)
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
        tau = 1.0 if any(a.top_k is not None for a in batch) else self._tau()
        with self._timed(batch):
            steps = self.decoder.prefill([a.seq for a in batch], chunks, tau)
        for a, chunk in zip(batch, chunks, strict=True):
            a.prefilled += len(chunk)
        self._finish_steps(batch, steps, sample=[a.decoding for a in batch])

    def _step(self) -> None:
        if self.speculative:
            for a in self._running:
                verdict = self.cloud.verdict(a.request.request_id)
                if verdict is not None and a.decoding and a.ids:
                    self._take_verdict(a, verdict)
            self._running = [a for a in self._running if not a.done]
        ready = [a for a in self._running if a.decoding and a.ids and not a.awaiting]
        if not ready:
            return
        tau = 1.0 if any(a.top_k is not None for a in ready) else self._tau()
        with self._timed(ready):
            steps = self.decoder.decode([a.seq for a in ready], [a.ids[-1] for a in ready], tau)
        self._finish_steps(ready, steps, sample=[True] * len(ready))

    @contextmanager
    def _timed(self, batch: list[_Active]) -> Iterator[None]:
        t0 = time.perf_counter()
        j0 = self.meter.read_joules() if self.meter is not None else 0.0
        yield
        if self.meter is not None:
            joules = max(0.0, self.meter.read_joules() - j0)
            self.stats.energy_j += joules
            for a in batch:
                a.energy_j += joules / len(batch)
        spent = time.perf_counter() - t0
        if self.config.slowdown > 1.0:
            time.sleep(spent * (self.config.slowdown - 1.0))
        self.stats.model_s += time.perf_counter() - t0
        self.stats.steps += 1

    def _tau(self) -> float:
        if self.cloud is not None and self.cloud.available():
            self.tau_now = self.tau_policy.effective(self.cloud.expected_ms())
        else:
            self.tau_now = self.config.tau
        return self.tau_now

    def _finish_steps(
        self, batch: list[_Active], steps: list[StepResult], sample: list[bool]
    ) -> None:
        """Hand split-layer states to the cloud, ask it for the tokens the edge is not
        confident about (in parallel, bounded by the link's timeout), emit the rest."""
        for a, step, want in zip(batch, steps, sample, strict=True):
            if want and a.top_k is not None:  # forced: the client picks the token
                a.awaiting = True
                self._send(a, top_logprobs(step, a.top_k, len(a.ids), len(a.request.prompt_ids)))
        if any(a.top_k is not None for a in batch):
            keep = [a.top_k is None for a in batch]
            batch = [a for a, k in zip(batch, keep, strict=True) if k]
            steps = [s for s, k in zip(steps, keep, strict=True) if k]
            sample = [w for w, k in zip(sample, keep, strict=True) if k]
        if self.speculative:
            if self.cloud.available():
                self._finish_speculative(batch, steps, sample)
                return
            for a in batch:  # no cloud to check them: drafts go out as the edge's own
                a.meta[a.emitted :] = [(layer, "fallback") for layer, _ in a.meta[a.emitted :]]
        cloud = self.cloud
        asks: dict[int, concurrent.futures.Future] = {}
        for i, (a, step, want) in enumerate(zip(batch, steps, sample, strict=True)):
            ask = want and step.reached is not None and not step.confident
            if cloud is not None and step.reached is not None:
                cloud.append(a.request.request_id, step.reached, upload=not ask)
                if ask and cloud.available():
                    position = step.reached.start_pos + step.reached.hidden.shape[0] - 1
                    asks[i] = cloud.ask(a.request.request_id, position, a.request.params)
        self._wait_for_cloud(asks.values())
        for i, (a, step, want) in enumerate(zip(batch, steps, sample, strict=True)):
            if not want:
                continue
            if i in asks:
                try:
                    answer = asks[i].result(timeout=0)
                    self._emit(a, answer.token, self.n_layers, "cloud")
                    continue
                except CloudUnavailable as exc:
                    log.debug("request %s: %s", a.request.request_id, exc)
                except Exception:  # not answered in time, or a bug: never fail the request
                    asks[i].cancel()
                    log.exception("request %s: cloud answer failed", a.request.request_id)
            unverified = not step.confident or self.speculative  # no cloud checked it
            fallback = step.reached is not None and unverified and cloud is not None
            token, _ = pick(a.sampler, step)
            self._emit(a, token, step.exit_layer, "fallback" if fallback else "edge")
        self._running = [a for a in self._running if not a.done]

    def _finish_speculative(
        self, batch: list[_Active], steps: list[StepResult], sample: list[bool]
    ) -> None:
        """Speculative mode: drafts for confident tokens, cloud tokens for the others;
        wait only for those, and for flushes of drafts that may not grow any further."""
        cloud = self.cloud
        asks: dict[int, tuple[concurrent.futures.Future, bool]] = {}
        for i, (a, step, want) in enumerate(zip(batch, steps, sample, strict=True)):
            sid, reached = a.request.request_id, step.reached
            assert reached is not None  # no exits before the split in this mode
            position = reached.start_pos + reached.hidden.shape[0] - 1
            if not want:  # a prompt chunk before the last
                cloud.append(sid, reached, upload=True, epoch=a.epoch)
                continue
            flush = False
            if step.confident:
                draft = make_draft(position, step, a.sampler)
                cloud.draft(sid, a.epoch, draft)
                a.ids.append(draft.token)
                a.meta.append((step.exit_layer, "edge"))
                flush = self._drafts_full(a)
            ask = flush or not step.confident
            cloud.append(sid, reached, upload=not ask, epoch=a.epoch)
            if ask:
                asks[i] = (cloud.ask(sid, position, a.request.params, a.epoch), flush)
        self._wait_for_cloud(f for f, _ in asks.values())
        for i, (future, flush) in asks.items():
            a, step = batch[i], steps[i]
            try:
                answer = future.result(timeout=0)
            except Exception as exc:  # unanswered: the edge's own tokens, as in "final"
                if not isinstance(exc, CloudUnavailable):
                    future.cancel()
                    log.exception("request %s: cloud answer failed", a.request.request_id)
                if not flush:
                    token, _ = pick(a.sampler, step)
                    a.ids.append(token)
                    a.meta.append((step.exit_layer, "fallback"))
                a.meta = [(layer, "fallback") for layer, _ in a.meta]
                self._emit_upto(a, len(a.ids))
                continue
            if self._take_verdict(a, answer.verdict):  # rolled back; the verdict says it all
                continue
            if not flush:
                a.ids.append(answer.token)
                a.meta.append((self.n_layers, "cloud"))
            self._emit_upto(a, len(a.ids))  # all checked: the answer covers every draft
        self._running = [a for a in self._running if not a.done]

    def _wait_for_cloud(self, futures: Iterable[concurrent.futures.Future]) -> None:
        """Wait for one step's cloud answers, bounded by the link's timeout (+5 s for the
        link's own retries); the time counts as cloud wait."""
        futures = list(futures)
        if futures:
            t0 = time.perf_counter()
            concurrent.futures.wait(futures, timeout=self.cloud.config.timeout_s + 5)
            self.stats.cloud_wait_s += time.perf_counter() - t0

    def _drafts_full(self, a: _Active) -> bool:
        """True when `a` may not draft further before its drafts are checked."""
        params = a.request.params
        return (
            len(a.ids) >= params.max_tokens
            or (a.ids[-1] in self.codec.eos_ids and not params.ignore_eos)
            or len(a.request.prompt_ids) + len(a.ids) >= self.max_context
            or len(a.ids) - a.emitted >= self.config.max_drafts
        )

    def _take_verdict(self, a: _Active, verdict: Verdict | None) -> bool:
        """Apply the cloud's verdict on `a`'s drafts: emit what it accepted; on a rejected
        draft roll back to its position and continue from the cloud's token. Returns
        whether it rolled back."""
        if verdict is None or verdict.epoch < a.epoch:
            return False
        rolled = verdict.epoch > a.epoch
        if rolled:
            rb = verdict.rollback
            keep = rb.position + 1 - len(a.request.prompt_ids)  # generated tokens kept
            a.ids[keep:] = [rb.token]
            a.meta[keep:] = [(self.n_layers, "cloud")]
            a.seq.truncate(rb.position + 1)
            a.epoch = verdict.epoch
        self._emit_upto(a, verdict.checked - len(a.request.prompt_ids) + 1)
        return rolled

    def _release_cloud(self, a: _Active) -> None:
        if self.cloud is not None:
            self.cloud.release(a.request.request_id)

    def _emit(self, a: _Active, token: int, exit_layer: int, source: TokenSource) -> None:
        a.ids.append(token)
        a.meta.append((exit_layer, source))
        self._emit_upto(a, len(a.ids))

    def _emit_upto(self, a: _Active, n: int) -> None:
        """Send generated tokens up to the n-th to the client (those not sent yet)."""
        while a.emitted < min(n, len(a.ids)) and not a.done:
            self._send_token(a, a.ids[a.emitted], *a.meta[a.emitted])

    def _send_token(self, a: _Active, token: int, exit_layer: int, source: TokenSource) -> None:
        a.emitted += 1
        params = a.request.params
        finish: FinishReason | None = None
        is_eos = token in self.codec.eos_ids and not params.ignore_eos
        if not is_eos:
            a.detok.add(token)
        last = (
            is_eos
            or a.emitted >= params.max_tokens
            or len(a.request.prompt_ids) + a.emitted >= self.max_context
        )
        if last:
            a.detok.flush()  # an incomplete character shows as a full decode shows it
        text, hit = a.stop.feed(a.detok.text)
        if hit:
            finish = "stop"
        elif last:
            finish = "stop" if is_eos else "length"
            text += a.stop.flush()
        if finish is not None:
            a.done = True
            a.seq = None
            self._release_cloud(a)
        self._send(
            a,
            GenerationChunk(
                text=text,
                token_ids=(token,),
                exit_layers=(exit_layer,),
                sources=(source,),
                prompt_tokens=len(a.request.prompt_ids),
                completion_tokens=a.emitted,
                finish_reason=finish,
                report=self._energy_report(a) if finish is not None else None,
            ),
        )

    @property
    def energy_source(self) -> str | None:
        return None if self.meter is None else self.meter.source

    def _energy_report(self, a: _Active) -> dict | None:
        """usage.tandem fields: this request's joules and where they come from."""
        if self.meter is None:
            return None
        return {"energy_joules": round(a.energy_j, 6), "energy_source": self.meter.source}

    @staticmethod
    def _send(a: _Active, item: GenerationChunk | TopLogprobs | BaseException) -> None:
        try:
            a.loop.call_soon_threadsafe(a.out.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            a.done = True
