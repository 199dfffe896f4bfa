"""gRPC front of the cloud context manager (tandem.cloud.v1.CloudContext).

Model work (and the Redis log writes that must precede each answer) runs on one dedicated
thread, so calls from many edges are serialised against the model and never block the
event loop. Token requests that arrive while the model is busy are answered together:
one batched forward over all their sessions' catch-up rows (continuous batching across
edges; at most one request per session per batch). Errors map to status codes the edge
can act on; UNAVAILABLE means the session log (Redis) did not answer and nothing was
acknowledged: retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from services.cloud_ctx.context_manager import (
    CloudContextManager,
    CloudToken,
    PositionMismatch,
    TokenAsk,
)
from services.cloud_ctx.metrics import CloudMetrics
from services.cloud_ctx.session_log import LogUnavailable
from services.cloud_ctx.session_store import SessionTooLarge, UnknownSession
from tandem.clients.pool import PoolUnavailable
from tandem.energy.meter import EnergyMeter
from tandem.transport.cloud_wire import (
    EXPECTED_POSITION_KEY,
    hidden_from_proto,
    sampling_from_proto,
    speculation_from_proto,
    verdict_to_proto,
)
from tandem.transport.grpc_auth import BearerAuth
from tandem.transport.grpc_tls import TlsConfig, add_port
from tandem.transport.hidden import HiddenPayload
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc

log = logging.getLogger(__name__)
MAX_CONCURRENT_RPCS = 1024
T = TypeVar("T")


@dataclass
class _Waiter:
    request: cloud_pb2.TokenRequest
    queued: float
    answer: asyncio.Future
    started: float = 0.0
    finished: float = 0.0


class CloudServicer(cloud_pb2_grpc.CloudContextServicer):
    def __init__(
        self,
        manager: CloudContextManager,
        metrics: CloudMetrics | None = None,
        meter: EnergyMeter | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.meter = meter  # energy of the model thread's work, per request (metrics)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-model")
        self._queue: list[_Waiter] = []  # token requests not yet in a batch (event loop)
        self._batcher: asyncio.Task | None = None

    async def _run(self, context: grpc.aio.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        """Run fn on the model thread; map errors to status codes; count the call and
        its queue and compute time."""
        queued = time.perf_counter()
        started = queued

        def timed() -> T:
            nonlocal started
            started = time.perf_counter()
            j0 = self._joules()
            try:
                return fn()
            finally:
                self._energy(rpc, j0, 1)

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._worker, timed)
        except Exception as exc:
            await self._abort(context, rpc, exc)
        finally:
            self._time(rpc, queued, started)
        self._count(rpc, "OK")
        return result

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception):
        code, detail, expected = self._status(rpc, exc)
        if expected is not None:
            context.set_trailing_metadata(((EXPECTED_POSITION_KEY, str(expected)),))
        await context.abort(code, detail)

    def _status(self, rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str, int | None]:
        """The status code, detail and (FAILED_PRECONDITION) expected position for a
        failed call; counted."""
        code, detail, expected = grpc.StatusCode.INTERNAL, "internal error", None
        if isinstance(exc, UnknownSession):
            code, detail = grpc.StatusCode.NOT_FOUND, f"unknown session {exc}; re-upload"
        elif isinstance(exc, PositionMismatch):
            code, detail, expected = grpc.StatusCode.FAILED_PRECONDITION, str(exc), exc.expected
        elif isinstance(exc, SessionTooLarge):
            code, detail = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        elif isinstance(exc, LogUnavailable):
            code, detail = grpc.StatusCode.UNAVAILABLE, f"session log unavailable: {exc}"
        elif isinstance(exc, PoolUnavailable):
            code, detail = grpc.StatusCode.UNAVAILABLE, f"attention pool unavailable: {exc}"
        elif isinstance(exc, ValueError):
            code, detail = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        else:
            log.error("%s failed", rpc, exc_info=exc)
        self._count(rpc, code.name)
        return code, detail, expected

    def _count(self, rpc: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.record_request(rpc, code)

    def _time(self, rpc: str, queued: float, started: float) -> None:
        if self.metrics is not None:
            self.metrics.record_timing(
                rpc, started - queued, max(0.0, time.perf_counter() - started)
            )

    def _joules(self) -> float:
        return self.meter.read_joules() if self.meter is not None else 0.0

    def _energy(self, rpc: str, j0: float, requests: int) -> None:
        """The model thread's energy since j0, shared by `requests` (it runs one at a time,
        so spans do not overlap)."""
        if self.meter is not None and self.metrics is not None and requests:
            joules = max(0.0, self.meter.read_joules() - j0)
            self.metrics.record_energy(rpc, joules, requests, self.meter.source)

    def _hidden(self, msg: cloud_pb2.HiddenStates, via: str) -> HiddenPayload:
        payload = hidden_from_proto(msg)
        if self.metrics is not None:
            self.metrics.record_hidden(via, payload.nbytes(), payload.n_tokens)
        return payload

    async def Upload(self, request_iterator, context):
        reply = cloud_pb2.UploadReply()
        async for req in request_iterator:
            if req.HasField("speculation"):
                held, verdict = await self._run(context, "Upload", lambda r=req: self._speculate(r))
                reply.positions = held
                reply.verdict.CopyFrom(verdict_to_proto(verdict))
                continue
            reply.positions = await self._run(
                context,
                "Upload",
                lambda r=req: self.manager.upload(
                    r.session_id, r.start_pos, self._hidden(r.hidden, "upload")
                ),
            )
        return reply

    def _speculate(self, req: cloud_pb2.UploadRequest):
        return self.manager.speculate(
            req.session_id,
            req.start_pos,
            self._hidden(req.hidden, "upload"),
            speculation_from_proto(req.speculation),
        )

    async def NextToken(self, request, context):
        waiter = self._enqueue(request)
        try:
            result = await waiter.answer
        except Exception as exc:
            self._time("NextToken", waiter.queued, waiter.started or waiter.queued)
            await self._abort(context, "NextToken", exc)
        return self._reply("NextToken", waiter, result)

    async def NextTokens(self, request, context):
        """A step's token requests in one message: all queued at once, so they share a
        batch (one per session per forward), each answered or failed in its place."""
        waiters = [self._enqueue(r) for r in request.requests]
        reply = cloud_pb2.TokenBatchReply()
        for w in waiters:
            out = reply.results.add()
            try:
                result = await w.answer
            except Exception as exc:
                self._time("NextToken", w.queued, w.started or w.queued)
                code, detail, expected = self._status("NextToken", exc)
                out.error.code, out.error.detail = code.value[0], detail
                if expected is not None:
                    out.error.expected_position = expected
                continue
            out.reply.CopyFrom(self._reply("NextToken", w, result))
        return reply

    def _enqueue(self, request: cloud_pb2.TokenRequest) -> _Waiter:
        waiter = _Waiter(request, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._answer_batches())
        return waiter

    def _reply(self, rpc: str, waiter: _Waiter, result: CloudToken) -> cloud_pb2.TokenReply:
        self._time(rpc, waiter.queued, waiter.started)
        self._count(rpc, "OK")
        if self.metrics is not None:
            self.metrics.record_token(result.catch_up_rows)
        reply = cloud_pb2.TokenReply(
            token_id=result.token,
            prob=result.prob,
            catch_up_rows=result.catch_up_rows,
            compute_ms=(waiter.finished - waiter.started) * 1e3,
            queue_ms=(waiter.started - waiter.queued) * 1e3,
            load=len(self._queue) + 1,
        )
        if result.verdict is not None:
            reply.verdict.CopyFrom(verdict_to_proto(result.verdict))
        return reply

    async def _answer_batches(self) -> None:
        """Take every queued token request (one per session) and answer them with one
        batched forward on the model thread, until the queue is empty."""
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, later, seen = [], [], set()
            for w in self._queue:
                (later if w.request.session_id in seen else batch).append(w)
                seen.add(w.request.session_id)
            self._queue = later
            if self.metrics is not None:
                self.metrics.record_batch(len(batch))
            try:
                answers = await loop.run_in_executor(self._worker, self._answer, batch)
            except Exception as exc:  # the forward itself failed: every request in it
                answers = [exc] * len(batch)
            for w, answer in zip(batch, answers, strict=True):
                if w.answer.done():  # the client went away
                    continue
                if isinstance(answer, Exception):
                    w.answer.set_exception(answer)
                else:
                    w.answer.set_result(answer)

    def _answer(self, batch: list[_Waiter]) -> list[CloudToken | Exception]:
        started = time.perf_counter()
        j0 = self._joules()
        asks: list[TokenAsk | Exception] = []
        for w in batch:
            w.started = started
            req = w.request
            try:
                hidden = self._hidden(req.hidden, "token") if req.HasField("hidden") else None
                params = sampling_from_proto(req.sampling)
                spec = (
                    speculation_from_proto(req.speculation) if req.HasField("speculation") else None
                )
                asks.append(TokenAsk(req.session_id, req.position, params, hidden, spec))
            except ValueError as exc:
                asks.append(exc)
        valid = [a for a in asks if isinstance(a, TokenAsk)]
        answers = iter(self.manager.next_tokens(valid))
        out = [a if isinstance(a, Exception) else next(answers) for a in asks]
        finished = time.perf_counter()
        for w in batch:
            w.finished = finished
        self._energy("NextToken", j0, len(batch))
        return out

    async def Release(self, request, context):
        released = await self._run(
            context, "Release", lambda: self.manager.release(request.session_id)
        )
        return cloud_pb2.ReleaseReply(released=released)


@dataclass
class RunningCloudServer:
    server: grpc.aio.Server
    port: int

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)


async def start_cloud_server(
    manager: CloudContextManager,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics: CloudMetrics | None = None,
    token: str | None = None,
    tls: TlsConfig | None = None,
    meter: EnergyMeter | None = None,
) -> RunningCloudServer:
    """With `token`, every call needs `authorization: Bearer <token>` (UNAUTHENTICATED).
    With `tls`, the port serves TLS only (tandem.transport.grpc_tls)."""
    server = grpc.aio.server(
        # bounded: beyond this many calls at once gRPC answers RESOURCE_EXHAUSTED (overloaded)
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        interceptors=[BearerAuth(token)] if token else [],
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    cloud_pb2_grpc.add_CloudContextServicer_to_server(
        CloudServicer(manager, metrics, meter), server
    )
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    log.info(
        "cloud context gRPC server listening on %s:%d (%s)",
        host,
        bound,
        "TLS" if tls else "plaintext",
    )
    return RunningCloudServer(server, bound)
