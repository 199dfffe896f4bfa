"""The edge's link to the cloud context manager (CE-CoLLM collaborative mode).

The engine thread hands over split-layer states as they are computed (`append`) and asks
for tokens (`ask`, a concurrent future). Everything else runs on the link's own asyncio
loop thread:

- Upload: asynchronous and incremental. At most one upload per session is in flight; it
  sends every position the cloud has not acknowledged yet, so uploads coalesce while the
  edge keeps generating.
- Token request: carries the states of the positions not yet acknowledged, ending at the
  asked one (normally just that one; more after a failure or while an upload is still in
  flight, which the cloud's idempotent upload makes harmless). No request ever waits for
  an upload.
- Recovery: NOT_FOUND (the cloud lost the session and has no log to rebuild it from) or
  FAILED_PRECONDITION (a gap; the cloud says where it ends) resets the acknowledged
  position and the request is resent with the missing states, which the edge keeps.
- Failure: a timeout or an unreachable cloud raises `CloudUnavailable` (the engine falls
  back to the edge's own token) and opens a circuit: no cloud calls for `backoff_s`,
  doubling up to `max_backoff_s`, then one probe.
- Speculative sessions (`speculate`): the engine registers each draft (`draft`) before
  the state of the position it follows; every upload and token request carries the drafts
  of its rows and the session's epoch, and every reply a verdict (`verdict`). A rollback
  in a verdict truncates this side's copy of the states, drops later drafts and moves to
  the new epoch; `append`/`draft` calls of an older epoch (the engine had not seen the
  rollback yet) are dropped.
- `context="full"` is the naive baseline of the CE-CoLLM paper: no uploads, every token
  request sends the full context to a fresh cloud session.
- An optional `EmulatedLink` delays every message by the link's bandwidth and RTT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
import torch

from tandem.runtime.decoder import Reached
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft, Speculation, Verdict
from tandem.transport.cloud_wire import (
    EXPECTED_POSITION_KEY,
    hidden_to_proto,
    sampling_to_proto,
    speculation_to_proto,
    verdict_from_proto,
)
from tandem.transport.grpc_auth import bearer_metadata
from tandem.transport.grpc_tls import TlsConfig, aio_channel
from tandem.transport.hidden import Encoding
from tandem.transport.network import EmulatedLink, LinkProfile
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc

log = logging.getLogger(__name__)
_GATHER_TURNS = 2  # event-loop turns a token request waits for others of its step
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_TRIPPING = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,  # a misconfigured edge backs off instead of hammering
}


@dataclass(frozen=True)
class CloudLinkConfig:
    target: str  # host:port of cloud_ctx's gRPC server
    encoding: Encoding = "fp16"
    timeout_s: float = 2.0  # a token request slower than this falls back to the edge
    backoff_s: float = 1.0  # no cloud calls for this long after a failure (doubles)
    max_backoff_s: float = 30.0
    context: Literal["incremental", "full"] = "incremental"
    link: LinkProfile | None = None  # emulated network; None = the real one
    client_id: str = "edge"  # prefix of this edge's cloud session ids
    token: str | None = None  # internal bearer token, sent as `authorization` metadata
    tls: TlsConfig | None = None  # TLS to cloud_ctx (None: plaintext)
    # the token requests made while one is being sent go out together, in one message
    # (one step's requests of several sessions); False: one message per request
    batch_asks: bool = True


@dataclass(frozen=True)
class CloudAnswer:
    token: int
    prob: float
    round_trip_s: float  # from ask() to the answer, retries included
    compute_s: float  # the cloud's model time for the last attempt
    rows_sent: int  # split-layer states this request carried
    catch_up_rows: int  # rows the cloud ran for this answer (its pending + this request's)
    bytes_up: int
    verdict: Verdict | None = None  # speculative sessions
    queue_s: float = 0.0  # of the last attempt: waiting for the cloud's model thread
    link_s: float = 0.0  # of the last attempt: time in the emulated link, up and down


class CloudUnavailable(Exception):
    """The cloud did not answer in time (or at all); use the edge's own token."""


@dataclass
class LinkCounters:
    """Totals since start; read by the metrics exporter and the benchmark."""

    token_requests: int = 0
    token_failures: int = 0
    skipped_circuit_open: int = 0
    uploads: int = 0
    upload_failures: int = 0
    token_messages: int = 0  # messages that carried token requests (several per message
    # with `batch_asks`)
    bytes_up: int = 0  # every message the edge sent (uploads + token requests)
    bytes_down: int = 0
    positions_sent: int = 0  # split-layer states sent (resends included)
    recoveries: int = 0  # NOT_FOUND / FAILED_PRECONDITION answered by resending
    round_trip_s: float = 0.0  # summed over answered token requests
    cloud_s: float = 0.0  # of which the cloud's model + queue time
    catch_up_rows: int = 0  # rows the cloud ran through its layers for our answers
    drafts_sent: int = 0  # speculative: drafts made (each sent until the cloud judged it)
    rollbacks: int = 0  # speculative: rejected drafts (each rolled a session back)


@dataclass
class _Session:
    cloud_id: str
    chunks: list[torch.Tensor] = field(default_factory=list)  # the edge's copy, in order
    length: int = 0  # positions held here
    acked: int = 0  # positions the cloud confirmed holding
    uploading: bool = False
    requests: int = 0
    closed: bool = False
    # speculative sessions: sampling parameters, epoch, drafts not judged yet, newest verdict
    speculation: SamplingParams | None = None
    epoch: int = 0
    drafts: dict[int, Draft] = field(default_factory=dict)
    verdict: Verdict | None = None

    def truncate(self, n: int) -> None:
        """Keep the states of positions [0, n)."""
        while self.chunks and self.length - self.chunks[-1].shape[0] >= n:
            self.length -= self.chunks.pop().shape[0]
        if self.length > n:
            self.chunks[-1] = self.chunks[-1][: n - self.length]
            self.length = n
        self.acked = min(self.acked, n)

    def speculation_for(self, start: int, end: int) -> Speculation | None:
        """The epoch and the drafts not judged yet after positions [start, end)."""
        if self.speculation is None:
            return None
        drafts = tuple(self.drafts[p] for p in sorted(self.drafts) if start <= p < end)
        return Speculation(self.epoch, self.speculation, drafts)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """States of positions [start, end)."""
        out, pos = [], self.length
        for chunk in reversed(self.chunks):
            if pos <= start:
                break
            lo = pos - chunk.shape[0]
            out.append(chunk[max(start, lo) - lo : min(end, pos) - lo])
            pos = lo
        return torch.cat(out[::-1])


class CloudLink:
    def __init__(self, config: CloudLinkConfig) -> None:
        self.config = config
        self.counters = LinkCounters()
        self.emulated = EmulatedLink(config.link) if config.link is not None else None
        self._sessions: dict[str, _Session] = {}
        self._metadata = bearer_metadata(config.token)
        self._down_until = 0.0
        self._backoff = config.backoff_s
        self._network_ms: float | None = None  # EWMA of round trip minus cloud time
        self._compute_ms: float | None = None  # EWMA of the cloud's model + queue time
        self._load = 1
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cloud-link")
        self._thread.daemon = True
        self._channel: grpc.aio.Channel | None = None
        self._stub: cloud_pb2_grpc.CloudContextStub | None = None
        # token requests waiting to share a message (loop thread)
        self._outbox: list[tuple[cloud_pb2.TokenRequest, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    # -- lifecycle (any thread) --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _connect(self) -> None:
        opts = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        self._channel = aio_channel(self.config.target, self.config.tls, opts)
        self._stub = cloud_pb2_grpc.CloudContextStub(self._channel)

    async def _disconnect(self) -> None:
        for s in list(self._sessions.values()):
            await self._release(s)
        if self._channel is not None:
            await self._channel.close()

    # -- engine-thread API ---------------------------------------------------------------

    def available(self) -> bool:
        """False while the circuit is open after a failure."""
        return time.monotonic() >= self._down_until

    def expected_ms(self) -> float | None:
        """Predicted time of the next token request: network EWMA + cloud time EWMA
        scaled by the cloud's last reported load. None before the first answer."""
        if self._network_ms is None or self._compute_ms is None:
            return None
        return self._network_ms + self._compute_ms * max(1, self._load)

    def append(
        self, session_id: str, reached: Reached, upload: bool, epoch: int | None = None
    ) -> None:
        """Keep the states of positions that reached the split; upload them now unless
        a token request for them follows (`upload=False`), which carries them. With
        `epoch` (speculative sessions) the call is dropped if a rollback came since."""
        self._loop.call_soon_threadsafe(self._append, session_id, reached, upload, epoch)

    def speculate(self, session_id: str, params: SamplingParams) -> None:
        """Make `session_id` speculative (before its first append)."""
        self._loop.call_soon_threadsafe(self._speculate, session_id, params)

    def draft(self, session_id: str, epoch: int, draft: Draft) -> None:
        """A draft for the token after `draft.position`, sent with that position's state."""
        self._loop.call_soon_threadsafe(self._draft, session_id, epoch, draft)

    def verdict(self, session_id: str) -> Verdict | None:
        """The newest verdict on a speculative session's drafts (any thread)."""
        s = self._sessions.get(session_id)
        return None if s is None else s.verdict

    def ask(
        self, session_id: str, position: int, params: SamplingParams, epoch: int | None = None
    ) -> concurrent.futures.Future[CloudAnswer]:
        """The cloud's token after `position` (whose state was appended). With `epoch`
        (speculative sessions) an ask from before a rollback the link already took is
        answered at once with that rollback's verdict."""
        return asyncio.run_coroutine_threadsafe(
            self._ask_in_time(session_id, position, params, epoch), self._loop
        )

    def release(self, session_id: str) -> None:
        self._loop.call_soon_threadsafe(self._release_later, session_id)

    # -- loop thread ---------------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = _Session(f"{self.config.client_id}:{session_id}")
        return s

    def _speculate(self, session_id: str, params: SamplingParams) -> None:
        self._session(session_id).speculation = params

    def _draft(self, session_id: str, epoch: int, draft: Draft) -> None:
        s = self._session(session_id)
        if epoch == s.epoch:
            s.drafts[draft.position] = draft
            self.counters.drafts_sent += 1

    def _append(self, session_id: str, reached: Reached, upload: bool, epoch: int | None) -> None:
        s = self._session(session_id)
        if epoch is not None and epoch != s.epoch:
            return  # a branch the cloud already rolled back
        if reached.start_pos != s.length:
            log.error(
                "session %s: states at %d, expected %d", session_id, reached.start_pos, s.length
            )
            return
        s.chunks.append(reached.hidden.detach())
        s.length += reached.hidden.shape[0]
        if upload and self.config.context == "incremental" and not s.uploading:
            s.uploading = True  # before the task starts: one upload task per session
            self._loop.create_task(self._upload(s))

    def _release_later(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            s.closed = True
            if self.config.context == "incremental" and (s.acked or s.uploading or s.requests):
                self._loop.create_task(self._release(s))

    async def _release(self, s: _Session) -> None:
        req = cloud_pb2.ReleaseRequest(session_id=s.cloud_id)
        try:
            await self._cross(req.ByteSize(), "up")
            reply = await self._stub.Release(
                req, timeout=self.config.timeout_s, metadata=self._metadata
            )
            await self._cross(reply.ByteSize(), "down")
        except grpc.aio.AioRpcError as exc:  # the cloud's TTL cleans up after us
            log.debug("release of %s failed: %s", s.cloud_id, exc.code())

    def _hidden(self, s: _Session, start: int, end: int) -> cloud_pb2.HiddenStates:
        return hidden_to_proto(s.rows(start, end), self.config.encoding)

    async def _cross(self, nbytes: int, direction: Literal["up", "down"]) -> float:
        """Count a message's bytes and let it cross the emulated link; the time it spent
        there (the link's delay, plus the event loop's lateness in waking it)."""
        if direction == "up":
            self.counters.bytes_up += nbytes
        else:
            self.counters.bytes_down += nbytes
        if self.emulated is None:
            return 0.0
        t0 = time.perf_counter()
        await self.emulated.send(nbytes, direction)
        return time.perf_counter() - t0

    async def _upload(self, s: _Session) -> None:
        try:
            while s.acked < s.length and not s.closed and self.available():
                start, end = s.acked, s.length
                req = cloud_pb2.UploadRequest(
                    session_id=s.cloud_id, start_pos=start, hidden=self._hidden(s, start, end)
                )
                spec = s.speculation_for(start, end)
                if spec is not None:
                    req.speculation.CopyFrom(speculation_to_proto(spec))
                await self._cross(req.ByteSize(), "up")
                try:
                    reply = await self._stub.Upload(
                        iter([req]), timeout=self.config.timeout_s, metadata=self._metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    self.counters.upload_failures += 1
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        s.acked = min(s.acked, _expected(exc, s.acked))
                        self.counters.recoveries += 1
                        continue
                    if exc.code() in _TRIPPING:
                        self._trip()
                    return
                await self._cross(reply.ByteSize(), "down")
                self.counters.uploads += 1
                self.counters.positions_sent += end - start
                verdict = verdict_from_proto(reply.verdict) if spec is not None else None
                if self._judged(s, verdict):
                    s.acked = max(s.acked, reply.positions)
        finally:
            s.uploading = False

    async def _ask_in_time(
        self, session_id: str, position: int, params: SamplingParams, epoch: int | None
    ) -> CloudAnswer:
        if not self.available():
            self.counters.skipped_circuit_open += 1
            raise CloudUnavailable("cloud circuit open after a recent failure")
        self.counters.token_requests += 1
        try:
            return await asyncio.wait_for(
                self._ask(self._session(session_id), position, params, epoch),
                self.config.timeout_s,
            )
        except TimeoutError as exc:
            self._fail(trip=True)
            raise CloudUnavailable(f"no cloud answer in {self.config.timeout_s} s") from exc
        except grpc.aio.AioRpcError as exc:
            self._fail(trip=exc.code() in _TRIPPING)
            raise CloudUnavailable(f"cloud error {exc.code().name}: {exc.details()}") from exc

    async def _ask(
        self, s: _Session, position: int, params: SamplingParams, epoch: int | None
    ) -> CloudAnswer:
        t0 = time.perf_counter()
        sampling = sampling_to_proto(params)
        full = self.config.context == "full"
        for attempt in range(3):
            # checked before every attempt: a rollback may land between any two awaits
            if epoch is not None and epoch != s.epoch and s.verdict is not None:
                rb = s.verdict.rollback
                assert rb is not None  # a newer epoch began with a rollback
                return CloudAnswer(rb.token, rb.prob, 0.0, 0.0, 0, 0, 0, s.verdict)
            start = 0 if full else min(s.acked, position)
            cloud_id = f"{s.cloud_id}#{s.requests}" if full else s.cloud_id
            s.requests += 1
            req = cloud_pb2.TokenRequest(
                session_id=cloud_id,
                position=position,
                hidden=self._hidden(s, start, position + 1),
                sampling=sampling,
            )
            spec = s.speculation_for(start, position + 1)
            if spec is not None:
                req.speculation.CopyFrom(speculation_to_proto(spec))
            self.counters.positions_sent += position + 1 - start
            try:
                reply, link_s = await self._token(req)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if attempt < 2 and code == grpc.StatusCode.NOT_FOUND:
                    s.acked = 0
                elif attempt < 2 and code == grpc.StatusCode.FAILED_PRECONDITION:
                    s.acked = min(s.acked, _expected(exc, 0))
                else:
                    raise
                self.counters.recoveries += 1
                continue
            verdict = None
            if spec is not None:
                verdict = verdict_from_proto(reply.verdict)
            if full:
                self._loop.create_task(self._release(_Session(cloud_id)))
            elif self._judged(s, verdict):
                s.acked = max(s.acked, position + 1)
            elapsed = time.perf_counter() - t0
            self.counters.round_trip_s += elapsed
            self.counters.cloud_s += (reply.compute_ms + reply.queue_ms) / 1e3
            self.counters.catch_up_rows += reply.catch_up_rows
            self._observe(elapsed * 1e3, reply)
            return CloudAnswer(
                token=reply.token_id,
                prob=reply.prob,
                round_trip_s=elapsed,
                compute_s=reply.compute_ms / 1e3,
                rows_sent=position + 1 - start,
                catch_up_rows=reply.catch_up_rows,
                bytes_up=req.ByteSize(),
                verdict=verdict,
                queue_s=reply.queue_ms / 1e3,
                link_s=link_s,
            )
        raise AssertionError("unreachable")

    async def _token(self, req: cloud_pb2.TokenRequest) -> tuple[cloud_pb2.TokenReply, float]:
        """Send one token request; its reply and the emulated link's delay (up + down).
        With `batch_asks` the requests made together (one engine step's, submitted back to
        back) go out in one NextTokens message."""
        if not self.config.batch_asks:
            return await self._token_alone(req)
        answer = self._loop.create_future()
        self._outbox.append((req, answer))
        if self._sender is None or self._sender.done():
            self._sender = self._loop.create_task(self._send_outbox())
        return await answer

    async def _token_alone(self, req: cloud_pb2.TokenRequest) -> tuple[cloud_pb2.TokenReply, float]:
        link_s = await self._cross(req.ByteSize(), "up")
        self.counters.token_messages += 1
        reply = await self._stub.NextToken(req, metadata=self._metadata)
        return reply, link_s + await self._cross(reply.ByteSize(), "down")

    async def _send_outbox(self) -> None:
        """Gather the token requests queued by now and send them as one message; again
        while more come. The engine submits a step's asks back to back from its thread:
        two loop turns let them all arrive."""
        for _ in range(_GATHER_TURNS):
            await asyncio.sleep(0)
        while self._outbox:
            batch, self._outbox = self._outbox, []
            batch = [(r, f) for r, f in batch if not f.done()]  # timed out meanwhile
            if batch:
                self._loop.create_task(self._send_batch(batch))
            await asyncio.sleep(0)

    async def _send_batch(self, batch: list[tuple[cloud_pb2.TokenRequest, asyncio.Future]]) -> None:
        try:
            if len(batch) == 1:
                result: object = await self._token_alone(batch[0][0])
                answers = [result]
            else:
                msg = cloud_pb2.TokenBatch(requests=[r for r, _ in batch])
                link_s = await self._cross(msg.ByteSize(), "up")
                self.counters.token_messages += 1
                reply = await self._stub.NextTokens(
                    msg, timeout=self.config.timeout_s, metadata=self._metadata
                )
                link_s += await self._cross(reply.ByteSize(), "down")
                if len(reply.results) != len(batch):
                    raise RuntimeError(
                        f"{len(reply.results)} results for {len(batch)} token requests"
                    )
                answers = [_result(r, link_s) for r in reply.results]
        except Exception as exc:  # the whole message failed: every request in it
            answers = [exc] * len(batch)
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    def _judged(self, s: _Session, verdict: Verdict | None) -> bool:
        """Take a reply's verdict (speculative sessions); False if the reply belongs to an
        epoch that has ended (its positions say nothing about the current branch)."""
        if verdict is None:
            return s.speculation is None
        if verdict.epoch > s.epoch:  # the cloud rejected a draft: roll back to match
            assert verdict.rollback is not None
            keep = verdict.rollback.position + 1
            s.truncate(keep)
            s.drafts = {p: d for p, d in s.drafts.items() if p < keep - 1}
            s.epoch = verdict.epoch
            self.counters.rollbacks += 1
        elif verdict.epoch < s.epoch:
            return False
        # judged drafts are done; the others stay, so a resend (the cloud lost the session)
        # carries them again and none goes out unjudged
        s.drafts = {p: d for p, d in s.drafts.items() if p >= verdict.checked}
        old = s.verdict
        if old is None or (verdict.epoch, verdict.checked) > (old.epoch, old.checked):
            s.verdict = verdict
        return True

    def _observe(self, round_trip_ms: float, reply: cloud_pb2.TokenReply) -> None:
        cloud_ms = reply.compute_ms + reply.queue_ms
        network_ms = max(0.0, round_trip_ms - cloud_ms)
        self._network_ms = _ewma(self._network_ms, network_ms)
        self._compute_ms = _ewma(self._compute_ms, reply.compute_ms)
        self._load = max(1, reply.load)
        self._backoff = self.config.backoff_s

    def _fail(self, trip: bool) -> None:
        self.counters.token_failures += 1
        if trip:
            self._trip()

    def _trip(self) -> None:
        self._down_until = time.monotonic() + self._backoff
        log.warning("cloud unreachable or slow; edge-standalone for %.1f s", self._backoff)
        self._backoff = min(self._backoff * 2, self.config.max_backoff_s)


def _result(
    r: cloud_pb2.TokenResult, link_s: float
) -> tuple[cloud_pb2.TokenReply, float] | grpc.aio.AioRpcError:
    """A batched request's reply, or its failure as the error NextToken would raise."""
    if not r.HasField("error"):
        return r.reply, link_s
    trailing = grpc.aio.Metadata()
    if r.error.HasField("expected_position"):
        trailing.add(EXPECTED_POSITION_KEY, str(r.error.expected_position))
    code = _CODES.get(r.error.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, r.error.detail)


def _expected(exc: grpc.aio.AioRpcError, default: int) -> int:
    for key, value in exc.trailing_metadata() or ():
        if key == EXPECTED_POSITION_KEY:
            return int(value)
    return default


def _ewma(old: float | None, new: float, alpha: float = 0.2) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
