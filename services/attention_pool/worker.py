"""One attention worker (tandem.attn.v1.AttentionWorker): the KV cache of a range of KV heads
over the cloud layers, and the attention over it.

- `Attend` (bidirectional stream, as long-lived as the caller): each message is one
  (step, layer) for a batch of sequences, packed (all sequences' q, k, v in one blob, one
  blob back) or per item (`wire`). PHASE_QKV appends k_new / v_new and answers causal
  attention over the cache: decode rows (one per sequence) through
  `partial_attention.decode_attention`, catch-up rows through `attend_with_cache`.
  PHASE_Q computes the previous tokens' part (output + log-sum-exp) at once and keeps it;
  the PHASE_KV message with the same call_id (same stream) appends k_new / v_new, computes
  the new rows' part and merges the two exactly (`tandem.runtime.partial_attention`). One
  reply per QKV or KV message, none for a Q message. Messages of one stream run
  concurrently (replies carry call_id and layer); a KV message waits for its Q part.
- An item whose session holds fewer positions at that layer than its start_pos (or is not
  here yet, at start_pos > 0) waits up to `load_wait_s` for `LoadKV` to bring it there:
  prefill KV is loaded asynchronously. Then NOT_FOUND / FAILED_PRECONDITION (with `have`) /
  RESOURCE_EXHAUSTED go in the reply's `errors`; bad shapes, dtype, head range or layer end
  the call with INVALID_ARGUMENT.
- `LoadKV` (client stream) appends prefill KV (same position rule; start_pos 0 creates the
  session) and wakes the Attend items waiting for it. `Truncate` keeps a session's first n
  positions at every layer (a speculative rollback; lengths only, the buffers stay).
  `Release`, `Stats` (worker_id is random per start, so a restart shows).

All tensor work (decode, append, attention) runs on one compute thread: one worker is one
core's worth of attention, and the event loop stays free to read, wait and reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from services.attention_pool.kv_store import (
    KVCapacityExceeded,
    KVStore,
    KVStoreError,
    PositionMismatch,
    UnknownSession,
)
from services.attention_pool.metrics import AttnMetrics
from tandem.runtime.partial_attention import (
    attend_with_cache,
    decode_attention,
    merge,
    partial_attention,
)
from tandem.transport.attn_wire import (
    WIRE_DTYPES,
    AttendBatch,
    attend_reply,
    from_bytes,
    parse_attend,
)
from tandem.transport.grpc_auth import BearerAuth
from tandem.transport.grpc_tls import TlsConfig, add_port
from tandem_proto.attn.v1 import attn_pb2, attn_pb2_grpc

log = logging.getLogger(__name__)
MAX_CONCURRENT_RPCS = 512
T = TypeVar("T")

HAVE_KEY = "tandem-have"  # trailing metadata of a FAILED_PRECONDITION LoadKV: positions held
PHASES = {attn_pb2.PHASE_QKV: "qkv", attn_pb2.PHASE_Q: "q", attn_pb2.PHASE_KV: "kv"}
_END = object()


@dataclass(frozen=True)
class ModelShape:
    """What the worker must know of the model: total heads, head size, attention scale."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float

    def __post_init__(self) -> None:
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads do not group over {self.n_kv_heads} kv heads")

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


class CallError(Exception):
    """Ends the whole call with `code`."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def _invalid(detail: str) -> CallError:
    return CallError(grpc.StatusCode.INVALID_ARGUMENT, detail)


def decode(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes -> tensor of `shape` (a copy: the message buffer is read-only)."""
    return torch.frombuffer(bytearray(data), dtype=torch.int16).view(dtype).reshape(shape)


def encode(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.to(dtype).contiguous().view(torch.int16).numpy().tobytes()


def item_error(session_id: str, exc: Exception) -> attn_pb2.ItemError:
    if isinstance(exc, UnknownSession):
        return attn_pb2.ItemError(session_id=session_id, code="NOT_FOUND", message=str(exc))
    if isinstance(exc, PositionMismatch):
        return attn_pb2.ItemError(
            session_id=session_id, code="FAILED_PRECONDITION", message=str(exc), have=exc.have
        )
    if isinstance(exc, KVCapacityExceeded):
        return attn_pb2.ItemError(
            session_id=session_id, code="RESOURCE_EXHAUSTED", message=str(exc)
        )
    if isinstance(exc, ValueError):
        return attn_pb2.ItemError(session_id=session_id, code="INVALID_ARGUMENT", message=str(exc))
    log.error("attend item of %r failed", session_id, exc_info=exc)
    return attn_pb2.ItemError(session_id=session_id, code="INTERNAL", message=repr(exc))


@dataclass
class _Partial:
    """A phase-Q result kept for its phase-KV message."""

    q: torch.Tensor  # [n, q_heads, hd]
    out: torch.Tensor  # [n, q_heads, hd] float32, over positions [0, start_pos)
    lse: torch.Tensor  # [n, q_heads]
    start_pos: int
    n: int


_QResult = _Partial | attn_pb2.ItemError


class AttentionWorkerServicer(attn_pb2_grpc.AttentionWorkerServicer):
    def __init__(
        self,
        store: KVStore,
        shape: ModelShape,
        *,
        load_wait_s: float = 5.0,
        metrics: AttnMetrics | None = None,
        worker_id: str | None = None,
    ) -> None:
        if store.head_dim != shape.head_dim or store.kv_head_end > shape.n_kv_heads:
            raise ValueError("the store's heads do not fit the model shape")
        self.store = store
        self.shape = shape
        self.load_wait_s = load_wait_s
        self.metrics = metrics
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.kv_heads = store.kv_head_end - store.kv_head_start
        self.q_heads = self.kv_heads * shape.group
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attn-compute")
        self._changed = asyncio.Condition()  # notified after every append and release
        self._waiting = 0  # Attend items waiting in _await_loaded

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    # -- helpers -------------------------------------------------------------------------

    def _count(self, rpc: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.record_request(rpc, code)

    async def _run(self, fn: Callable[[], T], phase: str) -> T:
        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                if self.metrics is not None:
                    self.metrics.record_compute(phase, time.perf_counter() - t0)

        return await asyncio.get_running_loop().run_in_executor(self._compute, timed)

    async def _notify(self) -> None:
        if not self._waiting:  # nobody waits for a load: skip the condition's round trip
            return
        async with self._changed:
            self._changed.notify_all()

    def _check_header(self, layer: int, start: int, end: int, dtype: str) -> torch.dtype:
        first, last = self.store.first_layer, self.store.first_layer + self.store.n_layers
        if not first <= layer < last:
            raise _invalid(f"layer {layer} is outside this worker's layers [{first}, {last})")
        if (start, end) != (self.store.kv_head_start, self.store.kv_head_end):
            raise _invalid(
                f"kv heads [{start}, {end}) are not this worker's "
                f"[{self.store.kv_head_start}, {self.store.kv_head_end})"
            )
        if dtype not in WIRE_DTYPES:
            raise _invalid(f"dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        return WIRE_DTYPES[dtype]

    def _ready(self, session_id: str, layer: int, start_pos: int) -> bool:
        try:
            return self.store.length(session_id, layer) >= start_pos
        except UnknownSession:
            return start_pos == 0

    async def _await_loaded(self, session_id: str, layer: int, start_pos: int) -> None:
        """Until the session holds start_pos positions at layer (or load_wait_s passes);
        the compute step then answers with the right error if it still does not."""
        if self._ready(session_id, layer, start_pos):
            return
        t0 = time.perf_counter()
        ok = True
        self._waiting += 1
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._ready(session_id, layer, start_pos)),
                    self.load_wait_s,
                )
        except TimeoutError:
            ok = False
        finally:
            self._waiting -= 1
        if self.metrics is not None:
            self.metrics.record_wait(ok, time.perf_counter() - t0)

    def _reply(
        self,
        req: attn_pb2.AttendRequest,
        batch: AttendBatch,
        result: tuple[torch.Tensor, set[int], list, float],
        dt: torch.dtype,
        arrived: float,
    ) -> attn_pb2.AttendReply:
        out, failed, errors, ms = result
        out = out.cpu()  # the reply's bytes (a no-op on the CPU)
        if self.metrics is not None:
            self.metrics.record_attend(req.layer, time.perf_counter() - arrived, len(batch))
            for e in errors:
                self.metrics.record_item_error(e.code)
        return attend_reply(req, batch, out, failed, errors, ms, dt)

    # -- compute (on the compute thread) -------------------------------------------------

    def _compute_qkv(self, layer: int, b: AttendBatch):
        """Append every sequence's k, v and attend: (out [R, q_heads, hd] float32, failed
        sequence indices, their ItemErrors, compute ms)."""
        t0 = time.perf_counter()
        dev = self.store.device
        out = torch.empty(b.total_rows, self.q_heads, self.shape.head_dim, device=dev)
        failed: set[int] = set()
        errors = []
        decode_rows: list[int] = []
        caches = []
        assert b.q is not None and b.k is not None and b.v is not None
        for i, rows in enumerate(b.bounds()):
            sid, sp = b.session_ids[i], b.start_positions[i]
            try:
                k_all, v_all = self.store.append_view(sid, layer, sp, b.k[rows], b.v[rows])
                if rows.stop - rows.start == 1:
                    decode_rows.append(rows.start)
                    caches.append((k_all, v_all))
                else:
                    out[rows] = attend_with_cache(
                        b.q[rows],
                        k_all[:, :sp],
                        v_all[:, :sp],
                        k_all[:, sp:],
                        v_all[:, sp:],
                        self.shape.scale,
                    )
            except Exception as exc:
                failed.add(i)
                errors.append(item_error(sid, exc))
        if len(decode_rows) == b.total_rows:  # a pure decode batch: straight into `out`
            decode_attention(b.q, caches, self.shape.scale, out=out)
        elif decode_rows:
            idx = torch.tensor(decode_rows, device=dev)
            out[idx] = decode_attention(b.q[idx], caches, self.shape.scale)
        return out, failed, errors, (time.perf_counter() - t0) * 1e3

    def _compute_q(self, layer: int, b: AttendBatch) -> list[_QResult]:
        results: list[_QResult] = []
        assert b.q is not None
        for i, rows in enumerate(b.bounds()):
            sid, sp = b.session_ids[i], b.start_positions[i]
            try:
                q = b.q[rows]
                if sid in self.store or sp > 0:
                    have = self.store.length(sid, layer)
                    if have != sp:
                        raise PositionMismatch(sid, layer, sp, have)
                    kp, vp = self.store.view(sid, layer)
                else:  # a new session: created by the KV phase's append
                    kp = vp = torch.empty(
                        self.kv_heads, 0, self.shape.head_dim, device=self.store.device
                    )
                out, lse = partial_attention(q, kp[:, :sp], vp[:, :sp], self.shape.scale, False)
                results.append(_Partial(q, out, lse, sp, rows.stop - rows.start))
            except Exception as exc:
                results.append(item_error(sid, exc))
        return results

    def _compute_kv(self, req: attn_pb2.AttendRequest, b: AttendBatch, parts: list):
        t0 = time.perf_counter()
        dev = self.store.device
        out = torch.empty(b.total_rows, self.q_heads, self.shape.head_dim, device=dev)
        failed: set[int] = set()
        errors = []
        assert b.k is not None and b.v is not None
        for i, rows in enumerate(b.bounds()):
            sid, sp, part = b.session_ids[i], b.start_positions[i], parts[i]
            try:
                if part is None:
                    raise ValueError(f"no phase-Q message for call {req.call_id} on this stream")
                if isinstance(part, attn_pb2.ItemError):
                    failed.add(i)
                    errors.append(part)
                    continue
                n = rows.stop - rows.start
                if (part.start_pos, part.n) != (sp, n):
                    raise ValueError(
                        f"phase KV (start_pos {sp}, n {n}) does not match "
                        f"phase Q (start_pos {part.start_pos}, n {part.n})"
                    )
                k_all, v_all = self.store.append_view(sid, req.layer, sp, b.k[rows], b.v[rows])
                kn, vn = k_all[:, sp:], v_all[:, sp:]
                new, new_lse = partial_attention(part.q, kn, vn, self.shape.scale, causal=True)
                out[rows] = merge(part.out, part.lse, new, new_lse)[0]
            except Exception as exc:
                failed.add(i)
                errors.append(item_error(sid, exc))
        return out, failed, errors, (time.perf_counter() - t0) * 1e3

    # -- Attend ----------------------------------------------------------------------------

    async def Attend(self, request_iterator, context):
        replies: asyncio.Queue = asyncio.Queue()
        pending: dict[tuple[int, int, str], asyncio.Future] = {}  # phase-Q parts, this stream
        tasks: set[asyncio.Task] = set()

        def spawn(coro) -> None:
            async def guarded():
                try:
                    await coro
                except Exception as exc:  # an unexpected failure ends the call
                    replies.put_nowait(exc)

            task = asyncio.create_task(guarded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    arrived = time.perf_counter()
                    try:
                        self._start_message(req, arrived, pending, spawn, replies)
                    except CallError as exc:
                        replies.put_nowait(exc)
                        return
                    self._count("Attend", "OK")
                while tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                replies.put_nowait(_END)

        reader = asyncio.create_task(read())
        try:
            while True:
                reply = await replies.get()
                if reply is _END:
                    break
                if isinstance(reply, CallError):
                    self._count("Attend", reply.code.name)
                    await context.abort(reply.code, reply.detail)
                if isinstance(reply, Exception):
                    log.error("Attend failed", exc_info=reply)
                    self._count("Attend", "INTERNAL")
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {reply!r}")
                yield reply
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            for fut in pending.values():
                fut.cancel()

    def _start_message(self, req, arrived: float, pending: dict, spawn, replies) -> None:
        """Validate one Attend message and start its work (on the event loop, no waiting)."""
        dt = self._check_header(req.layer, req.kv_head_start, req.kv_head_end, req.dtype)
        if req.phase not in PHASES:
            raise _invalid(f"unknown phase {req.phase}")
        try:
            batch = parse_attend(req, self.q_heads, self.kv_heads, self.shape.head_dim, dt)
            if self.store.device.type != "cpu":  # compute where the KV lives
                batch.q, batch.k, batch.v = (
                    None if t is None else t.to(self.store.device)
                    for t in (batch.q, batch.k, batch.v)
                )
        except ValueError as exc:
            raise _invalid(str(exc)) from exc
        keys = [(req.call_id, req.layer, sid) for sid in batch.session_ids]
        if len(set(keys)) != len(keys):
            raise _invalid(f"call {req.call_id}: a session appears twice in one message")

        if req.phase == attn_pb2.PHASE_Q:
            loop = asyncio.get_running_loop()
            futures = []
            for key in keys:
                if key in pending:
                    raise _invalid(f"call {req.call_id}: phase Q for {key[2]!r} sent twice")
                futures.append(loop.create_future())
                pending[key] = futures[-1]
            spawn(self._phase_q(req, batch, futures))
        elif req.phase == attn_pb2.PHASE_KV:
            parts = [pending.pop(key, None) for key in keys]
            spawn(self._phase_kv(req, batch, dt, parts, arrived, replies))
        else:
            spawn(self._phase_qkv(req, batch, dt, arrived, replies))

    async def _wait_items(self, layer: int, b: AttendBatch) -> None:
        late = [
            (sid, sp)
            for sid, sp in zip(b.session_ids, b.start_positions, strict=True)
            if not self._ready(sid, layer, sp)
        ]
        if late:
            await asyncio.gather(*(self._await_loaded(sid, layer, sp) for sid, sp in late))

    async def _phase_qkv(self, req, batch: AttendBatch, dt, arrived: float, replies) -> None:
        await self._wait_items(req.layer, batch)
        result = await self._run(lambda: self._compute_qkv(req.layer, batch), "qkv")
        await self._notify()
        replies.put_nowait(self._reply(req, batch, result, dt, arrived))

    async def _phase_q(self, req, batch: AttendBatch, futures: list[asyncio.Future]) -> None:
        try:
            await self._wait_items(req.layer, batch)
            results = await self._run(lambda: self._compute_q(req.layer, batch), "q")
        except BaseException as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(
                        exc if isinstance(exc, Exception) else RuntimeError("cancelled")
                    )
            raise
        for fut, result in zip(futures, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _phase_kv(self, req, batch: AttendBatch, dt, futures, arrived, replies) -> None:
        parts: list[_QResult | None] = []
        for fut in futures:
            parts.append(None if fut is None else await fut)
        result = await self._run(lambda: self._compute_kv(req, batch, parts), "kv")
        await self._notify()
        replies.put_nowait(self._reply(req, batch, result, dt, arrived))

    # -- LoadKV, Release, Stats --------------------------------------------------------------

    def _load(self, req: attn_pb2.LoadKVRequest, dt: torch.dtype) -> None:
        shape = (req.n, self.kv_heads, self.shape.head_dim)
        k, v = from_bytes(req.k, dt, shape), from_bytes(req.v, dt, shape)
        self.store.append(req.session_id, req.layer, req.start_pos, k, v)

    async def LoadKV(self, request_iterator, context):
        loaded = 0
        async for req in request_iterator:
            try:
                dt = self._check_header(req.layer, req.kv_head_start, req.kv_head_end, req.dtype)
                want = req.n * self.kv_heads * self.shape.head_dim * 2
                if req.n < 1 or len(req.k) != want or len(req.v) != want:
                    raise _invalid(
                        f"k / v have {len(req.k)} / {len(req.v)} bytes, "
                        f"[n={req.n}, kv_heads, hd] is {want}"
                    )
                await self._run(lambda r=req, d=dt: self._load(r, d), "load")
            except (CallError, KVStoreError) as exc:
                await self._abort_load(context, exc)
            self._count("LoadKV", "OK")
            if self.metrics is not None:
                self.metrics.record_loaded(req.n)
            loaded += 1
            await self._notify()
        return attn_pb2.LoadKVReply(loaded=loaded)

    async def _abort_load(self, context, exc: Exception):
        if isinstance(exc, CallError):
            code, detail = exc.code, exc.detail
        elif isinstance(exc, UnknownSession):
            code, detail = grpc.StatusCode.NOT_FOUND, str(exc)
        elif isinstance(exc, PositionMismatch):
            code, detail = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            context.set_trailing_metadata(((HAVE_KEY, str(exc.have)),))
        elif isinstance(exc, KVCapacityExceeded):
            code, detail = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        else:
            code, detail = grpc.StatusCode.INTERNAL, repr(exc)
        self._count("LoadKV", code.name)
        await context.abort(code, detail)

    async def Release(self, request, context):
        released = self.store.release(request.session_id)
        self._count("Release", "OK")
        await self._notify()
        return attn_pb2.ReleaseReply(released=released)

    async def Truncate(self, request, context):
        """A speculative rollback: keep the first n positions at every layer (on the compute
        thread, after whatever it is appending). Never a silent mismatch: a layer holding
        fewer than n is FAILED_PRECONDITION (`have`), an unknown session NOT_FOUND."""
        sid, n = request.session_id, request.n
        try:
            await self._run(lambda: self.store.truncate(sid, n), "truncate")
        except UnknownSession as exc:
            self._count("Truncate", "NOT_FOUND")
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except PositionMismatch as exc:
            self._count("Truncate", "FAILED_PRECONDITION")
            context.set_trailing_metadata(((HAVE_KEY, str(exc.have)),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            self._count("Truncate", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._count("Truncate", "OK")
        return attn_pb2.TruncateReply()

    async def Stats(self, request, context):
        st = self.store.stats()
        self._count("Stats", "OK")
        return attn_pb2.StatsReply(
            kv_head_start=self.store.kv_head_start,
            kv_head_end=self.store.kv_head_end,
            n_layers=self.store.n_layers,
            first_layer=self.store.first_layer,
            kv_bytes=st.kv_bytes,
            capacity_bytes=st.capacity_bytes,
            sessions=st.sessions,
            evictions=st.evictions,
            worker_id=self.worker_id,
        )


@dataclass
class RunningAttentionWorker:
    server: grpc.aio.Server
    port: int
    servicer: AttentionWorkerServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.server.stop(grace)
        self.servicer.close()


async def start_attention_worker(
    servicer: AttentionWorkerServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls: TlsConfig | None = None,
) -> RunningAttentionWorker:
    """Serve `servicer` on host:port (0: a free port). With `token`, every call but Stats
    (the health check) needs `authorization: Bearer <token>`. With `tls`, TLS only."""
    stats = "/tandem.attn.v1.AttentionWorker/Stats"
    server = grpc.aio.server(
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,  # bounded; beyond: RESOURCE_EXHAUSTED
        interceptors=[BearerAuth(token, exempt=frozenset({stats}))] if token else [],
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
        ],
    )
    attn_pb2_grpc.add_AttentionWorkerServicer_to_server(servicer, server)
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    log.info(
        "attention worker %s (kv heads [%d, %d), layers [%d, %d)) on %s:%d",
        servicer.worker_id,
        servicer.store.kv_head_start,
        servicer.store.kv_head_end,
        servicer.store.first_layer,
        servicer.store.first_layer + servicer.store.n_layers,
        host,
        bound,
    )
    return RunningAttentionWorker(server, bound, servicer)
