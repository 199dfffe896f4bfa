"""CE-CoLLM's cloud context manager: the upper layers [split, L) of a split model.

The edge uploads split-layer hidden states of new positions (incrementally, while it
keeps generating) and asks for a token at the newest position. On a request the cloud
first catches up: every pending uploaded position and the asked one run through its
layers in one batched forward, which fills their KV; the last row gives the token.

With a `SessionLog` (Redis) every upload is logged before it is held in memory and every
answer is recorded before it is returned. A session missing from memory (restart,
eviction, another replica served it) is rebuilt from the log: the logged rows become
pending rows, so the next catch-up recomputes its KV in one forward, exactly as if it had
never been lost. Without a log the edge must upload the context again (NOT_FOUND).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.cloud_ctx.runner import LayerRunner, LocalRunner
from services.cloud_ctx.session_log import (
    LogLost,
    LogUnavailable,
    OwnershipLost,
    SessionLog,
    SessionRecord,
)
from services.cloud_ctx.session_store import CloudSession, LastToken, SessionStore, UnknownSession
from tandem.clients.pool import PoolKVLost
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import Sampler, SamplingParams
from tandem.transport.hidden import HiddenPayload, decode_hidden, encode_hidden

log = logging.getLogger(__name__)
T = TypeVar("T")
Hidden = torch.Tensor | HiddenPayload  # rows [n, d]: decoded, or as they came on the wire


class PositionMismatch(ValueError):
    """An upload or request does not continue the session; `expected` is where it must."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


@dataclass(frozen=True)
class TokenAsk:
    """One token request: the token after `position` of `session_id`."""

    session_id: str
    position: int
    params: SamplingParams
    hidden: Hidden | None = None  # states of positions position-n+1 .. position


@dataclass(frozen=True)
class CloudToken:
    token: int
    prob: float
    catch_up_rows: int  # rows run in this request's forward (pending + the asked one)


class CloudContextManager:
    def __init__(
        self,
        model: DecoderModel,
        split: int,
        store: SessionStore,
        log: SessionLog | None = None,
        runner: LayerRunner | None = None,
    ) -> None:
        """`runner` runs the layers (default: locally, KV in the sessions); an offload runner
        (attention pool) must free a session's KV when the store drops it (`on_drop`)."""
        if not 0 < split < model.cfg.n_layers:
            raise ValueError(f"split {split} must be inside (0, {model.cfg.n_layers})")
        self.model = model
        self.split = split
        self.store = store
        self.log = log
        self.runner = runner or LocalRunner(model, split)
        self.rebuilds = 0  # sessions rebuilt from the log
        self.kv_rebuilds = 0  # sessions recomputed after the attention pool lost their KV

    def upload(self, session_id: str, start_pos: int, hidden: Hidden) -> int:
        """Append hidden states [n, d] for positions start_pos.. ; returns positions held.
        Idempotent: rows for positions already held are skipped (an edge resends from its
        last acknowledged position after a failure); a gap raises PositionMismatch.
        A payload is logged as it came; with a log, a tensor is logged (and then held) as
        fp16, so what is held in memory is always exactly what a rebuild would get."""
        session, _ = self._fenced(session_id, lambda: self._upload(session_id, start_pos, hidden))
        return session.uploaded

    def next_token(
        self,
        session_id: str,
        position: int,
        params: SamplingParams,
        hidden: Hidden | None = None,
    ) -> CloudToken:
        """The token after `position`, which must be the session's newest position. Its
        hidden state was uploaded before or comes with the request: `hidden` [n, d] holds
        the states of positions position-n+1 .. position.
        The session keeps the sampler made from its first request's `params` (a seed then
        reproduces the whole stream). Asking for the same position again (a retry whose
        reply was lost) returns the same answer without sampling again."""
        [answer] = self.next_tokens([TokenAsk(session_id, position, params, hidden)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def next_tokens(self, asks: list[TokenAsk]) -> list[CloudToken | Exception]:
        """Token requests of different sessions, answered with one batched forward of all
        their catch-up rows. A request that fails (unknown session, gap, ...) gets its
        exception in its place; the others are answered."""
        if len({a.session_id for a in asks}) != len(asks):
            raise ValueError("one request per session in a batch")
        answers: list[CloudToken | Exception | None] = [None] * len(asks)
        to_run: list[tuple[int, CloudSession]] = []
        for i, ask in enumerate(asks):
            try:
                out = self._fenced(ask.session_id, lambda a=ask: self._prepare(a))
            except Exception as exc:  # this request's error; the batch goes on
                answers[i] = exc
                continue
            if isinstance(out, CloudToken):
                answers[i] = out
            else:
                to_run.append((i, out))
        if to_run:
            tokens = self._catch_up([session for _, session in to_run])
            for (i, _), token in zip(to_run, tokens, strict=True):
                answers[i] = token
        return answers  # type: ignore[return-value]

    def release(self, session_id: str) -> bool:
        logged = self.log.release(session_id) if self.log is not None else False
        return self.store.release(session_id) or logged

    # -- internals ---------------------------------------------------------------------

    def _upload(self, session_id: str, start_pos: int, hidden: Hidden) -> tuple[CloudSession, bool]:
        """Returns the session and whether this upload wrote to the log."""
        if start_pos < 0:
            raise ValueError(f"upload starts at negative position {start_pos}")
        if isinstance(hidden, HiddenPayload) and hidden.hidden_size != self.model.cfg.hidden_size:
            raise ValueError(
                f"hidden_size {hidden.hidden_size} != model's {self.model.cfg.hidden_size}"
            )
        session = self._session(session_id, create=True)
        if start_pos > session.uploaded and self.log is not None:
            self._check_current(session)  # a gap may only mean another replica moved on
        if start_pos > session.uploaded:
            raise PositionMismatch(
                f"session {session_id!r} holds {session.uploaded} positions; "
                f"upload starts at {start_pos}",
                session.uploaded,
            )
        fresh = _skip_rows(hidden, session.uploaded - start_pos)
        if fresh is None:
            return session, False
        if self.log is not None:
            if not isinstance(fresh, HiddenPayload):
                fresh = encode_hidden(fresh, "fp16")
            payload = fresh
            self._durable(
                session_id, lambda: self.log.append(session_id, session.uploaded, payload)
            )
        rows = decode_hidden(fresh, self.model.dtype) if isinstance(fresh, HiddenPayload) else fresh
        session.pending.append(rows.to(self.model.dtype))
        session.uploaded += rows.shape[0]
        self.store.enforce_cap(keep=session_id)
        return session, True

    def _prepare(self, ask: TokenAsk) -> CloudSession | CloudToken:
        """Upload the request's rows and check it; the session to run, or the answer
        itself for a retry of the last request."""
        logged = False
        if ask.hidden is not None:
            n = (
                ask.hidden.n_tokens
                if isinstance(ask.hidden, HiddenPayload)
                else ask.hidden.shape[0]
            )
            session, logged = self._upload(ask.session_id, ask.position + 1 - n, ask.hidden)
        else:
            session = self._session(ask.session_id, create=False)
        if self.log is not None and not logged:  # refresh the TTL, check we still own it
            self._check_current(session)
        last = session.last
        if last is not None and last.position == ask.position == session.uploaded - 1:
            self._record(session)  # a retry: same answer, nothing sampled
            return CloudToken(last.token, last.prob, 0)
        if ask.position != session.uploaded - 1:
            raise PositionMismatch(
                f"asked for position {ask.position}; session {ask.session_id!r} ends at "
                f"{session.uploaded - 1}",
                session.uploaded - 1,
            )
        if session.sampler is None:
            session.sampler = Sampler(ask.params)
        return session

    @torch.inference_mode()
    def _catch_up(self, sessions: list[CloudSession]) -> list[CloudToken | Exception]:
        """One forward through [split, L) of every session's pending rows (different
        sessions, one batch); sample each session's token from its last row. If the
        attention pool lost KV, the batch's sessions are recomputed from the log."""
        try:
            outs = self.runner.run([(s, torch.cat(s.pending)) for s in sessions])
        except PoolKVLost as exc:
            log.warning("%s; recomputing the batch's sessions", exc)
            return self._recompute(sessions)
        return self._answer(sessions, outs)

    def _recompute(self, sessions: list[CloudSession]) -> list[CloudToken | Exception]:
        """The pool lost (some of) these sessions' KV, and the others in the batch may hold
        partial layers of this step: free all of them in the pool and run each again from
        position 0 on the hidden states the log keeps (without a log: UnknownSession, the
        edge uploads its context again)."""
        rebuilt: list[tuple[int, CloudSession]] = []
        answers: list[CloudToken | Exception | None] = [None] * len(sessions)
        for i, old in enumerate(sessions):
            sid = old.session_id
            self.store.release(sid, "kv_lost")  # frees it in the pool too (on_drop)
            self.kv_rebuilds += 1
            if self.log is None:
                answers[i] = UnknownSession(sid)
                continue
            try:
                session = self._session(sid, create=False)
            except Exception as exc:
                answers[i] = exc
                continue
            if session.sampler is None:
                session.sampler = old.sampler
            rebuilt.append((i, session))
        if rebuilt:
            batch = [s for _, s in rebuilt]
            outs = self.runner.run([(s, torch.cat(s.pending)) for s in batch])
            for (i, _), token in zip(rebuilt, self._answer(batch, outs), strict=True):
                answers[i] = token
        return answers  # type: ignore[return-value]

    def _answer(
        self, sessions: list[CloudSession], outs: list[torch.Tensor]
    ) -> list[CloudToken | Exception]:
        logits = self.model.logits(torch.cat([h[-1:] for h in outs]))
        answers = []
        for session, h, row in zip(sessions, outs, logits, strict=True):
            session.pending.clear()
            session.computed = session.uploaded
            token, prob = session.sampler.sample(row)
            session.last = LastToken(session.uploaded - 1, token, prob)
            self.store.enforce_cap(keep=session.session_id)
            self._record(session)
            answers.append(CloudToken(token, prob, h.shape[0]))
        return answers

    def _check_current(self, session: CloudSession) -> None:
        """Refresh the log's TTL; OwnershipLost unless this replica owns the session and
        its memory copy holds everything logged."""
        sid = session.session_id
        held = self._durable(sid, lambda: self.log.touch(sid))
        if held != session.uploaded:
            raise OwnershipLost(sid, f"(log holds {held} positions, memory {session.uploaded})")

    def _record(self, session: CloudSession) -> None:
        """Log the newest answer before it goes out. The answer itself is right even if
        the session moved on: then only this replica's memory copy is dropped."""
        if self.log is None or session.last is None or session.sampler is None:
            return
        params = session.sampler.params
        state = None
        if params.seed is not None and not params.greedy:
            state = session.sampler.generator.get_state().numpy().tobytes()
        try:
            self.log.record_token(session.session_id, session.last, params, state)
        except (OwnershipLost, LogLost) as exc:
            log.warning("dropping session %r from memory: %s", session.session_id, exc)
            self.store.release(session.session_id, "stale")

    def _session(self, session_id: str, create: bool) -> CloudSession:
        """From memory; else rebuilt from the log; else new (create) or UnknownSession."""
        if session_id in self.store:
            return self.store.get(session_id)
        if self.log is not None:
            try:
                record = self.log.claim(session_id)
            except LogLost as exc:
                log.warning("discarding the broken log of session %r: %s", session_id, exc)
                self.log.release(session_id)
                record = None
            if record is not None:
                return self._rebuild(record)
        if not create:
            raise UnknownSession(session_id)
        return self.store.get_or_create(session_id)

    def _rebuild(self, record: SessionRecord) -> CloudSession:
        sid = record.session_id
        for _, p in record.payloads:
            if p.hidden_size != self.model.cfg.hidden_size:
                self.log.release(sid)
                raise UnknownSession(f"{sid} (its log holds hidden_size {p.hidden_size})")
        session = self.store.get_or_create(sid)
        session.pending = [decode_hidden(p, self.model.dtype) for _, p in record.payloads]
        session.uploaded = record.uploaded
        if record.sampling is not None:
            session.sampler = Sampler(record.sampling)
            if record.sampler_state is not None:
                state = torch.frombuffer(bytearray(record.sampler_state), dtype=torch.uint8)
                session.sampler.generator.set_state(state)
        session.last = record.last
        self.rebuilds += 1
        log.info(
            "rebuilt session %r from the log: %d positions (was owned by %s)",
            sid,
            record.uploaded,
            record.previous_owner,
        )
        self.store.enforce_cap(keep=sid)
        return session

    def _durable(self, session_id: str, write: Callable[[], T]) -> T:
        """A log write; a session whose log is gone is not durable any more: drop it."""
        try:
            return write()
        except LogLost:
            self.store.release(session_id, "stale")
            raise UnknownSession(session_id) from None

    def _fenced(self, session_id: str, fn: Callable[[], T]) -> T:
        """Run fn; if another replica took the session over, drop the memory copy and run
        again on a fresh rebuild from the log."""
        for _ in range(3):
            try:
                return fn()
            except OwnershipLost as exc:
                log.info("session %r: %s; rebuilding from the log", session_id, exc)
                self.store.release(session_id, "stale")
        raise LogUnavailable(f"session {session_id!r}: ownership keeps moving between replicas")


def _skip_rows(hidden: Hidden, k: int) -> Hidden | None:
    """The rows after the first k; None when nothing is left."""
    n = hidden.n_tokens if isinstance(hidden, HiddenPayload) else hidden.shape[0]
    if k >= n:
        return None
    if k == 0:
        return hidden
    if isinstance(hidden, torch.Tensor):
        return hidden[k:]
    row = hidden.hidden_size * (2 if hidden.encoding == "fp16" else 1)
    return HiddenPayload(
        hidden.encoding,
        n - k,
        hidden.hidden_size,
        hidden.data[k * row :],
        hidden.scales[4 * k :],
    )
