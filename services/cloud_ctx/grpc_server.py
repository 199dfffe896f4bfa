"""gRPC front of the cloud context manager (tandem.cloud.v1.CloudContext).

Model work (and the Redis log writes that must precede each answer) runs on one dedicated
thread, so calls from many edges are serialised against the model and never block the
event loop. Errors map to status codes the edge can act on; UNAVAILABLE means the session
log (Redis) did not answer and nothing was acknowledged: retry.
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

from services.cloud_ctx.context_manager import CloudContextManager, PositionMismatch
from services.cloud_ctx.metrics import CloudMetrics
from services.cloud_ctx.session_log import LogUnavailable
from services.cloud_ctx.session_store import SessionTooLarge, UnknownSession
from tandem.runtime.sampling import SamplingParams
from tandem.transport.cloud_wire import EXPECTED_POSITION_KEY, hidden_from_proto
from tandem.transport.hidden import HiddenPayload
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


def sampling_from_proto(msg: cloud_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
    )


class CloudServicer(cloud_pb2_grpc.CloudContextServicer):
    def __init__(self, manager: CloudContextManager, metrics: CloudMetrics | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-model")
        self._in_flight = 0  # token requests accepted and not answered (event-loop only)

    async def _run(self, context: grpc.aio.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        """Run fn on the model thread; map errors to status codes; count the call and
        its queue and compute time."""
        queued = time.perf_counter()
        started = queued

        def timed() -> T:
            nonlocal started
            started = time.perf_counter()
            return fn()

        code, detail = grpc.StatusCode.INTERNAL, "internal error"
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._worker, timed)
            code = grpc.StatusCode.OK
            return result
        except UnknownSession as exc:
            code, detail = grpc.StatusCode.NOT_FOUND, f"unknown session {exc}; re-upload"
        except PositionMismatch as exc:
            context.set_trailing_metadata(((EXPECTED_POSITION_KEY, str(exc.expected)),))
            code, detail = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except SessionTooLarge as exc:
            code, detail = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except LogUnavailable as exc:
            code, detail = grpc.StatusCode.UNAVAILABLE, f"session log unavailable: {exc}"
        except ValueError as exc:
            code, detail = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        finally:
            if self.metrics is not None:
                self.metrics.record_request(rpc, code.name)
                self.metrics.record_timing(
                    rpc, started - queued, max(0.0, time.perf_counter() - started)
                )
        await context.abort(code, detail)
        raise AssertionError("unreachable")

    def _hidden(self, msg: cloud_pb2.HiddenStates, via: str) -> HiddenPayload:
        payload = hidden_from_proto(msg)
        if self.metrics is not None:
            self.metrics.record_hidden(via, payload.nbytes(), payload.n_tokens)
        return payload

    async def Upload(self, request_iterator, context):
        positions = 0
        async for req in request_iterator:
            positions = await self._run(
                context,
                "Upload",
                lambda r=req: self.manager.upload(
                    r.session_id, r.start_pos, self._hidden(r.hidden, "upload")
                ),
            )
        return cloud_pb2.UploadReply(positions=positions)

    async def NextToken(self, request, context):
        timing: dict[str, float] = {}

        def work():
            timing["started"] = time.perf_counter()
            hidden = self._hidden(request.hidden, "token") if request.HasField("hidden") else None
            return self.manager.next_token(
                request.session_id, request.position, sampling_from_proto(request.sampling), hidden
            )

        queued = time.perf_counter()
        self._in_flight += 1
        try:
            result = await self._run(context, "NextToken", work)
        finally:
            self._in_flight -= 1
        done = time.perf_counter()
        if self.metrics is not None:
            self.metrics.record_token(result.catch_up_rows)
        started = timing["started"]
        return cloud_pb2.TokenReply(
            token_id=result.token,
            prob=result.prob,
            catch_up_rows=result.catch_up_rows,
            compute_ms=(done - started) * 1e3,
            queue_ms=(started - queued) * 1e3,
            load=self._in_flight + 1,
        )

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
) -> RunningCloudServer:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    cloud_pb2_grpc.add_CloudContextServicer_to_server(CloudServicer(manager, metrics), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("cloud context gRPC server listening on %s:%d", host, bound)
    return RunningCloudServer(server, bound)
