"""CE-CoLLM's cloud context manager: the upper layers [split, L) of a split model.

The edge uploads split-layer hidden states of new positions (incrementally, while it
keeps generating) and asks for a token at the newest position. On a request the cloud
first catches up: every pending uploaded position and the asked one run through its
layers in one batched forward, which fills their KV; the last row gives the token.

Speculative sessions (`--collab speculative`, lossless): uploads carry the edge's drafts,
and the manager runs its layers on every uploaded row at once instead of waiting for a
request, judging each draft against its own next-token distribution
(`tandem.runtime.speculative`). At the first rejected draft the session is truncated after
the draft's position, the replacement token becomes the session's newest answer, and the
epoch advances: the edge rolls back to the same point, and its messages of an older epoch
are answered with that rollback and otherwise ignored.

With a `SessionLog` (Redis) every upload is logged before it is acknowledged and every
answer is recorded before it is returned. The rows a token request carries are logged on
a log thread while the catch-up forward runs on them (`overlap_log`): the answer waits
for that write, and a request whose write failed is dropped from memory and run again
with its writes in line, so what goes out was durable first, as without the overlap.
A session missing from memory (restart, eviction, another replica served it) is rebuilt
from the log: the logged rows become pending rows, so the next catch-up recomputes its KV
in one forward, exactly as if it had never been lost. Without a log the edge must upload
the context again (NOT_FOUND).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
    SpeculativeState,
)
from services.cloud_ctx.session_store import CloudSession, LastToken, SessionStore, UnknownSession
from tandem.clients.pool import PoolKVLost
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import Sampler, SamplingParams
from tandem.runtime.speculative import Rollback, Speculation, Verdict, judge
from tandem.transport.hidden import HiddenPayload, decode_hidden, encode_hidden

log = logging.getLogger(__name__)
T = TypeVar("T")
Hidden = torch.Tensor | HiddenPayload  # rows [n, d]: decoded, or as they came on the wire


class _WriteFailed(Exception):
    """An overlapped log write of this session failed: nothing of its request may go out."""

    def __init__(self, session_id: str, cause: BaseException) -> None:
        super().__init__(f"session {session_id!r}: log write failed: {cause!r}")
        self.cause = cause


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
    speculation: Speculation | None = None


@dataclass(frozen=True)
class CloudToken:
    token: int
    prob: float
    catch_up_rows: int  # rows run in this request's forward (pending + the asked one)
    verdict: Verdict | None = None  # speculative sessions


class CloudContextManager:
    def __init__(
        self,
        model: DecoderModel,
        split: int,
        store: SessionStore,
        log: SessionLog | None = None,
        runner: LayerRunner | None = None,
        overlap_log: bool = True,
    ) -> None:
        """`runner` runs the layers (default: locally, KV in the sessions); an offload runner
        (attention pool) must free a session's KV when the store drops it (`on_drop`).
        `overlap_log`: token requests' log appends run beside the catch-up forward (on a
        thread of their own) instead of before it."""
        if not 0 < split < model.cfg.n_layers:
            raise ValueError(f"split {split} must be inside (0, {model.cfg.n_layers})")
        self.model = model
        self.split = split
        self.store = store
        self.log = log
        self.runner = runner or LocalRunner(model, split)
        self.rebuilds = 0  # sessions rebuilt from the log
        self.kv_rebuilds = 0  # sessions recomputed after the attention pool lost their KV
        self.overlap_retries = 0  # token requests run again after their overlapped write failed
        self.log_wait_s = 0.0  # time the caller (the model thread) spent blocked on the log
        self._log_thread = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-log")
            if log is not None and overlap_log
            else None
        )
        # while a batch of token requests is prepared: its log appends in flight, by session
        self._deferred: dict[str, list[Future]] | None = None

    def close(self) -> None:
        """Stop the log thread (after its writes in flight)."""
        if self._log_thread is not None:
            self._log_thread.shutdown(wait=True)

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
        exception in its place; the others are answered.
        With `overlap_log`, the log appends of the requests' rows run during the forward;
        every answer waits for its session's writes, and a session whose write failed is
        dropped from memory and its request run again alone with in-line writes (a
        rebuild from the log, an ownership check, or the error the edge should see)."""
        if len({a.session_id for a in asks}) != len(asks):
            raise ValueError("one request per session in a batch")
        answers: list[CloudToken | Exception | None] = [None] * len(asks)
        to_run: list[tuple[int, CloudSession]] = []
        self._deferred = {} if self._log_thread is not None else None
        try:
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
            deferred, self._deferred = self._deferred or {}, None
            ran = {session.session_id for _, session in to_run}
            if to_run:
                mine = {sid: w for sid, w in deferred.items() if sid in ran}
                tokens = self._catch_up([session for _, session in to_run], mine)
                for (i, _), token in zip(to_run, tokens, strict=True):
                    answers[i] = token
            # writes of requests that failed after their upload (e.g. a bad draft)
            rest = {sid: w for sid, w in deferred.items() if sid not in ran}
            for sid, failure in self._settle(rest).items():
                self.store.release(sid, "stale")
                for i, ask in enumerate(asks):
                    if ask.session_id == sid and not isinstance(answers[i], Exception):
                        answers[i] = failure
        finally:
            self._deferred = None
        for i, answer in enumerate(answers):
            if isinstance(answer, _WriteFailed):  # durable first: run it again, in line
                self.overlap_retries += 1
                answers[i] = self._serially(asks[i])
        return answers  # type: ignore[return-value]

    def _serially(self, ask: TokenAsk) -> CloudToken | Exception:
        """One token request with its log writes in line (after an overlapped write
        failed and its session left memory)."""
        try:
            out = self._fenced(ask.session_id, lambda: self._prepare(ask))
        except Exception as exc:
            return exc
        if isinstance(out, CloudToken):
            return out
        [token] = self._catch_up([out], None)
        return token

    def speculate(
        self, session_id: str, start_pos: int, hidden: Hidden, speculation: Speculation
    ) -> tuple[int, Verdict]:
        """A speculative upload: append the rows, then run them and judge their drafts.
        Returns the positions held and the verdict."""

        def run(overlap: bool) -> tuple[int, Verdict]:
            session = self._session(session_id, create=True)
            if self._stale(session, speculation):
                return session.uploaded, self._verdict(session)
            deferred = self._deferred = {} if overlap else None
            try:
                session, _ = self._upload(session_id, start_pos, hidden)
                self._deferred = None
                self._adopt(session, speculation)
                if session.pending:
                    try:  # the append is waited for before any draft is judged
                        self._run_drafted_rows(session, lambda: self._durable_now(deferred))
                    except PoolKVLost as exc:  # nothing judged yet: run it all again, rebuilt
                        log.warning("%s; recomputing session %r", exc, session_id)
                        self._durable_now(deferred)  # the rebuild reads these rows
                        session = self._rebuilt_after_kv_loss(session)
                        self._run_drafted_rows(session, None)
            finally:
                self._deferred = None
                self._durable_now(deferred)
            self._record(session)  # drafts, RNG state and epoch survive a rebuild
            return session.uploaded, self._verdict(session)

        try:
            return self._fenced(session_id, lambda: run(self._log_thread is not None))
        except _WriteFailed:  # durable first: drop what ran on the rows, run it in line
            self.store.release(session_id, "stale")
            self.overlap_retries += 1
            return self._fenced(session_id, lambda: run(False))

    def _durable_now(self, deferred: dict[str, list[Future]] | None) -> None:
        """Wait for (and forget) overlapped log writes; _WriteFailed if one failed."""
        if not deferred:
            return
        pending = dict(deferred)
        deferred.clear()
        failed = self._settle(pending)
        if failed:
            raise next(iter(failed.values()))

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
            payload, at = fresh, session.uploaded
            if self._deferred is not None and self._log_thread is not None:
                write = self._log_thread.submit(self.log.append, session_id, at, payload)
                self._deferred.setdefault(session_id, []).append(write)
            else:
                self._durable(session_id, lambda: self.log.append(session_id, at, payload))
        rows = decode_hidden(fresh, self.model.dtype) if isinstance(fresh, HiddenPayload) else fresh
        session.pending.append(rows.to(self.model.device, self.model.dtype))
        session.uploaded += rows.shape[0]
        self.store.enforce_cap(keep=session_id)
        return session, True

    def _prepare(self, ask: TokenAsk) -> CloudSession | CloudToken:
        """Upload the request's rows and check it; the session to run, or the answer
        itself for a retry of the last request."""
        logged = False
        if ask.speculation is not None:
            session = self._session(ask.session_id, create=True)
            if self._stale(session, ask.speculation):
                rb = session.rollback
                assert rb is not None  # an older epoch implies a rollback
                return CloudToken(rb.token, rb.prob, 0, self._verdict(session))
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
            verdict = self._verdict(session) if session.speculative else None
            return CloudToken(last.token, last.prob, 0, verdict)
        if ask.position != session.uploaded - 1:
            raise PositionMismatch(
                f"asked for position {ask.position}; session {ask.session_id!r} ends at "
                f"{session.uploaded - 1}",
                session.uploaded - 1,
            )
        if session.sampler is None:
            session.sampler = Sampler(ask.params)
        if ask.speculation is not None:
            self._adopt(session, ask.speculation)
        return session

    @torch.inference_mode()
    def _catch_up(
        self, sessions: list[CloudSession], deferred: dict[str, list[Future]] | None
    ) -> list[CloudToken | Exception]:
        """One forward through [split, L) of every session's pending rows (different
        sessions, one batch); sample each session's token from its last row. `deferred`:
        log writes still in flight, waited for before anything is answered (a session
        whose write failed leaves memory and gets `_WriteFailed`). If the attention pool
        lost KV, the batch's sessions are recomputed from the log."""
        try:
            outs = self.runner.run([(s, torch.cat(s.pending)) for s in sessions])
            lost = None
        except PoolKVLost as exc:
            outs, lost = None, exc
        failed = self._settle(deferred)
        answers: list[CloudToken | Exception | None] = [None] * len(sessions)
        keep = []
        for i, s in enumerate(sessions):
            if s.session_id in failed:
                self.store.release(s.session_id, "stale")  # its KV ran on rows not logged
                answers[i] = failed[s.session_id]
            else:
                keep.append(i)
        if keep:
            batch = [sessions[i] for i in keep]
            if lost is not None or outs is None:
                log.warning("%s; recomputing the batch's sessions", lost)
                done = self._recompute(batch)
            else:
                done = self._answer(batch, [outs[i] for i in keep])
            for i, token in zip(keep, done, strict=True):
                answers[i] = token
        return answers  # type: ignore[return-value]

    def _settle(self, deferred: dict[str, list[Future]] | None) -> dict[str, _WriteFailed]:
        """Wait for the batch's log writes; the sessions whose writes failed."""
        t0 = time.perf_counter()
        try:
            return self._settled(deferred)
        finally:
            self.log_wait_s += time.perf_counter() - t0

    @staticmethod
    def _settled(deferred: dict[str, list[Future]] | None) -> dict[str, _WriteFailed]:
        failed: dict[str, _WriteFailed] = {}
        for sid, writes in (deferred or {}).items():
            for write in writes:
                exc = write.exception()
                if exc is not None and sid not in failed:
                    log.info("session %r: overlapped log write failed: %r", sid, exc)
                    failed[sid] = _WriteFailed(sid, exc)
        return failed

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
            self._keep_drafts(session, old)
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
        answers: dict[int, CloudToken] = {}
        plain = []
        for i, (session, h) in enumerate(zip(sessions, outs, strict=True)):
            if session.speculative:
                answers[i] = self._answer_speculative(session, h)
            else:
                plain.append(i)
        if plain:
            logits = self.model.logits(torch.cat([outs[i][-1:] for i in plain]))
            for i, row in zip(plain, logits, strict=True):
                session = sessions[i]
                session.pending.clear()
                session.computed = session.uploaded
                token, prob = session.sampler.sample(row)
                answers[i] = self._answered(session, token, prob, outs[i].shape[0])
        return [answers[i] for i in range(len(sessions))]

    def _answered(self, session: CloudSession, token: int, prob: float, rows: int) -> CloudToken:
        session.last = LastToken(session.uploaded - 1, token, prob)
        self.store.enforce_cap(keep=session.session_id)
        self._record(session)
        verdict = self._verdict(session) if session.speculative else None
        return CloudToken(token, prob, rows, verdict)

    def _answer_speculative(self, session: CloudSession, h: torch.Tensor) -> CloudToken:
        """All pending rows ran (`h`): judge their drafts; the answer is a rejected draft's
        replacement, else the asked row's accepted draft or a fresh sample."""
        first = session.computed
        session.pending.clear()
        session.computed = session.uploaded
        rollback = self._judge(session, h, first)
        if rollback is not None:
            return rollback
        last = session.last
        if last is not None and last.position == session.uploaded - 1:  # its draft won
            return self._answered(session, last.token, last.prob, h.shape[0])
        token, prob = session.sampler.sample(self.model.logits(h[-1:])[0])
        return self._answered(session, token, prob, h.shape[0])

    @torch.inference_mode()
    def _run_drafted_rows(
        self, session: CloudSession, before_judging: Callable[[], None] | None
    ) -> None:
        """Speculative upload: run the pending rows now and judge their drafts. The newest
        row waits when it has no draft: the edge will ask for its token (or send a draft).
        `before_judging` runs after the forward (waits for the upload's overlapped log
        write: a judgement may roll the log back)."""
        rows = torch.cat(session.pending)
        n = rows.shape[0] - (0 if session.uploaded - 1 in session.drafts else 1)
        if n <= 0:
            return
        first = session.computed
        [h] = self.runner.run([(session, rows[:n])])
        if before_judging is not None:
            before_judging()
        session.pending = [rows[n:]] if n < rows.shape[0] else []
        session.computed += n
        self._judge(session, h, first)

    def _judge(self, session: CloudSession, h: torch.Tensor, first: int) -> CloudToken | None:
        """Judge the drafts after rows first.. (outputs `h`) in order; at the first rejection
        roll back and return the replacement. An accepted draft after the newest uploaded
        row becomes the session's answer for that row (`last`)."""
        positions = sorted(p for p in session.drafts if first <= p < first + h.shape[0])
        if not positions:
            return None
        logits = self.model.logits(h[torch.tensor(positions) - first])
        for pos, row in zip(positions, logits, strict=True):
            verdict = judge(row, session.drafts.pop(pos), session.sampler)
            if not verdict.accepted:
                return self._roll_back(session, pos, verdict.token, verdict.prob, h.shape[0])
            if pos == session.uploaded - 1:
                session.last = LastToken(pos, verdict.token, verdict.prob)
        return None

    def _roll_back(
        self, session: CloudSession, pos: int, token: int, prob: float, rows_run: int
    ) -> CloudToken:
        """The draft after `pos` was rejected for `token`: keep positions [0, pos], start a
        new epoch whose first token is `token`. If the attention pool lost the session's KV
        meanwhile, the session leaves memory once the rollback is logged: the next message
        rebuilds it from the log and recomputes its KV."""
        sid = session.session_id
        try:
            session.truncate(pos + 1, self.runner.truncate)
            kv_lost = False
        except PoolKVLost as exc:
            log.warning("%s; session %r is recomputed from its log", exc, sid)
            kv_lost = True
        session.epoch += 1
        session.rollback = session.last = LastToken(pos, token, prob)
        if self.log is not None:
            self._durable(sid, lambda: self.log.truncate(sid, pos + 1))
        self._record(session)
        verdict = self._verdict(session)
        if kv_lost:
            self.store.release(sid, "kv_lost")  # frees it in the pool too (on_drop)
            self.kv_rebuilds += 1
        return CloudToken(token, prob, rows_run, verdict)

    def _stale(self, session: CloudSession, speculation: Speculation) -> bool:
        """True for a message of an older epoch (sent before the edge saw a rollback). A
        fresh session (the old one was lost with no log to rebuild it from) takes the
        edge's epoch: the edge re-uploads its states, with every draft not judged yet."""
        if speculation.epoch > session.epoch and session.uploaded == 0:
            session.epoch = speculation.epoch
        if speculation.epoch > session.epoch:
            raise ValueError(
                f"epoch {speculation.epoch} is ahead of session {session.session_id!r} "
                f"(epoch {session.epoch})"
            )
        return speculation.epoch < session.epoch

    def _adopt(self, session: CloudSession, speculation: Speculation) -> None:
        """Take a message's drafts (each for a position this session holds or is about to)."""
        session.speculative = True
        if session.sampler is None:
            session.sampler = Sampler(speculation.params)
        for draft in speculation.drafts:
            if draft.position < session.computed:
                continue  # a resend: judged with its row, which every message carries with it
            if not session.sampler.params.greedy and not draft.q_ids:
                raise ValueError("a sampled draft must carry its draft distribution")
            session.drafts[draft.position] = draft

    def _rebuilt_after_kv_loss(self, old: CloudSession) -> CloudSession:
        """The pool lost a speculative session's KV before its drafts were judged: free it
        and rebuild it from the log (all positions pending), keeping the drafts not judged
        yet; without a log, UnknownSession (the edge uploads its context again)."""
        sid = old.session_id
        self.store.release(sid, "kv_lost")  # frees it in the pool too (on_drop)
        self.kv_rebuilds += 1
        if self.log is None:
            raise UnknownSession(sid)
        session = self._session(sid, create=False)
        if session.sampler is None:
            session.sampler = old.sampler
        self._keep_drafts(session, old)
        return session

    @staticmethod
    def _keep_drafts(session: CloudSession, old: CloudSession) -> None:
        """A rebuilt speculative session keeps the drafts its memory copy held and had not
        judged (the log holds those of the last answer only)."""
        if old.speculative:
            session.speculative = True
            session.drafts.update(old.drafts)

    @staticmethod
    def _verdict(session: CloudSession) -> Verdict:
        rb = session.rollback
        rollback = None if rb is None else Rollback(rb.position, rb.token, rb.prob)
        return Verdict(session.epoch, session.computed, rollback)

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
        if self.log is None or session.sampler is None:
            return
        if session.last is None and not session.speculative:
            return
        params = session.sampler.params
        state = None
        if params.seed is not None and not params.greedy:
            state = session.sampler.generator.get_state().numpy().tobytes()
        spec = None
        if session.speculative:
            drafts = tuple(session.drafts[p] for p in sorted(session.drafts))
            spec = SpeculativeState(session.epoch, drafts, session.rollback)
        t0 = time.perf_counter()
        try:
            self.log.record_token(session.session_id, session.last, params, state, spec)
        except (OwnershipLost, LogLost) as exc:
            log.warning("dropping session %r from memory: %s", session.session_id, exc)
            self.store.release(session.session_id, "stale")
        finally:
            self.log_wait_s += time.perf_counter() - t0

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
        session.pending = [
            decode_hidden(p, self.model.dtype).to(self.model.device) for _, p in record.payloads
        ]
        session.uploaded = record.uploaded
        if record.sampling is not None:
            session.sampler = Sampler(record.sampling)
            if record.sampler_state is not None:
                state = torch.frombuffer(bytearray(record.sampler_state), dtype=torch.uint8)
                session.sampler.generator.set_state(state)
        session.last = record.last
        if record.speculation is not None:
            session.speculative = True
            session.epoch = record.speculation.epoch
            session.rollback = record.speculation.rollback
            session.drafts = {d.position: d for d in record.speculation.drafts}
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
        t0 = time.perf_counter()
        try:
            return write()
        except LogLost:
            self.store.release(session_id, "stale")
            raise UnknownSession(session_id) from None
        finally:
            self.log_wait_s += time.perf_counter() - t0

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
    return hidden.rows(k, n)
