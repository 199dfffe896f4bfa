"""The compute side's view of an attention pool: fan one layer's attention out to the workers
by KV-head range and put the outputs back together.

`PoolClient(addresses, shape)` asks every worker for its head range (Stats) and checks that
the ranges partition the model's KV heads. Then, from any thread:

- `attend_rows(layer, session_ids, start_positions, rows, q, k, v)`: one layer's attention
  for a batch whose rows are already stacked (q [R, H, hd], k_new / v_new [R, KVH, hd], R =
  sum(rows)): every worker gets ONE packed message with its heads' slices of all sequences
  (one contiguous blob, `wire`) over its own long-lived bidirectional stream (one stream
  per worker per calling thread, i.e. per micro-batch, open for the client's lifetime), and
  answers with one blob; the output comes back as [R, H, hd]. `attend(layer, items)` is
  the same for per-sequence tensors. With `phased=True`, q goes out first (phase Q) and k, v
  right after (phase KV), so a worker starts the previous tokens' attention while k and v
  are still on the wire (Lamina's overlap); on loopback that costs a second message and a
  merge for nothing, so the default sends q, k and v together.
- `load_kv(loads)`: prefill KV computed on the compute side, sent layer by layer on a
  background thread (never blocks decode; a worker holds an Attend for a session until its
  load has arrived).
- `release(session_id)`: free the session's KV on every worker.
- `truncate(session_id, n)`: keep its first n positions on every worker (a speculative
  rollback; after the queued loads).

Errors: `PoolKVLost` names the sessions a worker has no (or inconsistent) KV for: rebuild
them. `PoolUnavailable`: a worker did not answer (dead, restarting); the stream is dropped
and the next call reconnects.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from tandem.transport.attn_wire import DTYPE_NAMES, from_bytes, pack_rows, to_bytes
from tandem.transport.grpc_auth import bearer_metadata
from tandem.transport.grpc_tls import TlsConfig, sync_channel
from tandem_proto.attn.v1 import attn_pb2, attn_pb2_grpc

log = logging.getLogger(__name__)

WIRE_DTYPES = DTYPE_NAMES
_STOP = object()


class PoolError(RuntimeError):
    pass


class PoolKVLost(PoolError):
    """Workers hold no (or inconsistent) KV for these sessions: recompute it."""

    def __init__(self, sessions: set[str], detail: str) -> None:
        super().__init__(f"attention pool lost the KV of {sorted(sessions)}: {detail}")
        self.sessions = sessions


class PoolUnavailable(PoolError):
    """A worker did not answer."""


@dataclass(frozen=True)
class PoolShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class AttendItem:
    session_id: str
    start_pos: int
    q: torch.Tensor  # [n, H, hd]
    k: torch.Tensor  # [n, KVH, hd]
    v: torch.Tensor


@dataclass(frozen=True)
class KVLoad:
    session_id: str
    layer: int
    start_pos: int
    k: torch.Tensor  # [n, KVH, hd]
    v: torch.Tensor


@dataclass
class PoolTraffic:
    """Bytes on the wire (tensor payloads only) and calls, for the bench and metrics."""

    sent: int = 0
    received: int = 0
    loaded: int = 0
    calls: int = 0
    call_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int, received: int, seconds: float) -> None:
        with self.lock:
            self.sent += sent
            self.received += received
            self.calls += 1
            self.call_s += seconds


class _Worker:
    def __init__(self, address: str, token: str | None, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.channel = sync_channel(address, tls)
        self.stub = attn_pb2_grpc.AttentionWorkerStub(self.channel)
        self.metadata = bearer_metadata(token)
        self.kv_start = self.kv_end = 0
        self.worker_id = ""

    def stats(self, timeout: float) -> attn_pb2.StatsReply:
        return self.stub.Stats(attn_pb2.StatsRequest(), timeout=timeout, metadata=self.metadata)


class _Lane:
    """One bidirectional Attend stream to one worker, used by one thread."""

    def __init__(self, worker: _Worker) -> None:
        self._q: queue.Queue = queue.Queue()
        self._replies = worker.stub.Attend(iter(self._q.get, _STOP), metadata=worker.metadata)

    def send(self, message: attn_pb2.AttendRequest) -> None:
        self._q.put(message)

    def receive(self) -> attn_pb2.AttendReply:
        return next(self._replies)

    def close(self) -> None:
        self._q.put(_STOP)
        self._replies.cancel()


class PoolClient:
    def __init__(
        self,
        addresses: Sequence[str],
        shape: PoolShape,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        connect_timeout_s: float = 30.0,
        phased: bool = False,
    ) -> None:
        if shape.n_heads % shape.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if shape.dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be bf16 or fp16, got {shape.dtype}")
        self.shape = shape
        self.phased = phased
        self.workers = [_Worker(a, token, tls) for a in addresses]
        self.traffic = PoolTraffic()
        self._local = threading.local()
        self._call_ids = iter(range(1, 1 << 62))
        self._ids_lock = threading.Lock()
        self._loads: queue.Queue = queue.Queue()
        self._loader = threading.Thread(target=self._load_loop, name="kv-loader", daemon=True)
        self._loader_error: Exception | None = None
        self.refresh(connect_timeout_s)
        self._loader.start()

    # -- topology ----------------------------------------------------------------------

    def refresh(self, timeout_s: float) -> None:
        """(Re)learn every worker's head range; they must partition [0, n_kv_heads)."""
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            while True:
                try:
                    grpc.channel_ready_future(w.channel).result(timeout=1)
                    reply = w.stats(timeout=5)
                    break
                except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
                    if time.monotonic() > deadline:
                        raise PoolUnavailable(f"worker {w.address}: {exc}") from exc
            w.kv_start, w.kv_end, w.worker_id = (
                reply.kv_head_start,
                reply.kv_head_end,
                reply.worker_id,
            )
        ranges = sorted((w.kv_start, w.kv_end) for w in self.workers)
        pos = 0
        for a, b in ranges:
            if a != pos or b <= a:
                raise ValueError(f"worker head ranges {ranges} do not partition the KV heads")
            pos = b
        if pos != self.shape.n_kv_heads:
            raise ValueError(f"worker head ranges {ranges} miss heads of {self.shape.n_kv_heads}")

    # -- attention ---------------------------------------------------------------------

    def attend(self, layer: int, items: Sequence[AttendItem]) -> list[torch.Tensor]:
        """Attention output [n, H, hd] of every item, in order (model dtype)."""
        if not items:
            return []
        out = self.attend_rows(
            layer,
            [it.session_id for it in items],
            [it.start_pos for it in items],
            [it.q.shape[0] for it in items],
            torch.cat([it.q for it in items]),
            torch.cat([it.k for it in items]),
            torch.cat([it.v for it in items]),
        )
        return list(out.split([it.q.shape[0] for it in items]))

    def attend_rows(
        self,
        layer: int,
        session_ids: Sequence[str],
        start_positions: Sequence[int],
        rows: Sequence[int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """One layer's attention for stacked rows: sequence i owns `rows[i]` consecutive
        rows starting at position `start_positions[i]`; q [R, H, hd], k / v [R, KVH, hd].
        Returns [R, H, hd] in q's dtype."""
        total = q.shape[0]
        if not session_ids:
            return q.new_empty(q.shape)
        with self._ids_lock:
            call_id = next(self._call_ids)
        dt, wire = self.shape.dtype, WIRE_DTYPES[self.shape.dtype]
        g, hd = self.shape.group, self.shape.head_dim
        lanes = self._lanes()
        t0 = time.perf_counter()
        sent = 0
        try:
            for w, lane in zip(self.workers, lanes, strict=True):
                whole = len(self.workers) == 1
                qw = q if whole else q[:, w.kv_start * g : w.kv_end * g]
                kw = k if whole else k[:, w.kv_start : w.kv_end]
                vw = v if whole else v[:, w.kv_start : w.kv_end]
                head = attn_pb2.AttendRequest(
                    call_id=call_id,
                    layer=layer,
                    kv_head_start=w.kv_start,
                    kv_head_end=w.kv_end,
                    dtype=wire,
                    session_ids=session_ids,
                    start_positions=start_positions,
                    rows=rows,
                )
                if self.phased:
                    qm, kvm = attn_pb2.AttendRequest(), attn_pb2.AttendRequest()
                    qm.CopyFrom(head)
                    kvm.CopyFrom(head)
                    qm.phase, qm.qkv = attn_pb2.PHASE_Q, pack_rows(qw, None, None, dt)
                    kvm.phase, kvm.qkv = attn_pb2.PHASE_KV, pack_rows(None, kw, vw, dt)
                    sent += len(qm.qkv) + len(kvm.qkv)
                    lane.send(qm)
                    lane.send(kvm)
                else:
                    head.qkv = pack_rows(qw, kw, vw, dt)
                    sent += len(head.qkv)
                    lane.send(head)
            replies = [lane.receive() for lane in lanes]
        except grpc.RpcError as exc:
            self._drop_lanes()
            code = exc.code() if hasattr(exc, "code") else None
            raise PoolUnavailable(f"attention worker failed ({code}): {exc}") from exc
        lost: set[str] = set()
        details = []
        for reply in replies:
            for err in reply.errors:
                lost.add(err.session_id)
                details.append(f"{err.session_id}: {err.code} {err.message}")
        if lost:
            raise PoolKVLost(lost, "; ".join(details[:4]))
        self.traffic.add(sent, sum(len(r.packed_out) for r in replies), time.perf_counter() - t0)
        parts = [
            from_bytes(r.packed_out, dt, (total, (w.kv_end - w.kv_start) * g, hd))
            for w, r in zip(self.workers, replies, strict=True)
        ]
        if len(parts) == 1:
            return parts[0].to(q.dtype, copy=True)
        return torch.cat(parts, dim=1).to(q.dtype)

    def _lanes(self) -> list[_Lane]:
        lanes = getattr(self._local, "lanes", None)
        if lanes is None:
            lanes = [_Lane(w) for w in self.workers]
            self._local.lanes = lanes
        return lanes

    def _drop_lanes(self) -> None:
        for lane in getattr(self._local, "lanes", None) or ():
            lane.close()
        self._local.lanes = None

    # -- prefill KV and release --------------------------------------------------------

    def load_kv(self, loads: Sequence[KVLoad]) -> None:
        """Queue prefill KV for the workers (sent in order on the loader thread)."""
        if self._loader_error is not None:
            err, self._loader_error = self._loader_error, None
            raise PoolUnavailable(f"loading KV failed: {err}") from err
        if loads:
            self._loads.put(list(loads))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued load has been sent (tests, benchmarks)."""
        done = threading.Event()
        self._loads.put(done)
        if not done.wait(timeout_s):
            raise PoolUnavailable("KV loads did not drain")
        if self._loader_error is not None:
            err, self._loader_error = self._loader_error, None
            raise PoolUnavailable(f"loading KV failed: {err}") from err

    def _load_loop(self) -> None:
        while True:
            job = self._loads.get()
            if isinstance(job, threading.Event):
                job.set()
                continue
            try:
                self._send_loads(job)
            except Exception as exc:  # noqa: BLE001 - the thread must live; the next attend
                log.warning("KV load failed: %s", exc)  # for those sessions sees NOT_FOUND
                self._loader_error = exc

    def _send_loads(self, loads: list[KVLoad]) -> None:
        dt, wire = self.shape.dtype, WIRE_DTYPES[self.shape.dtype]
        for w in self.workers:
            ks = slice(w.kv_start, w.kv_end)

            def messages(w: _Worker = w, ks: slice = ks) -> Iterator[attn_pb2.LoadKVRequest]:
                for ld in loads:
                    k, v = to_bytes(ld.k[:, ks], dt), to_bytes(ld.v[:, ks], dt)
                    with self.traffic.lock:
                        self.traffic.loaded += len(k) + len(v)
                    yield attn_pb2.LoadKVRequest(
                        session_id=ld.session_id,
                        layer=ld.layer,
                        kv_head_start=w.kv_start,
                        kv_head_end=w.kv_end,
                        dtype=wire,
                        start_pos=ld.start_pos,
                        n=ld.k.shape[0],
                        k=k,
                        v=v,
                    )

            w.stub.LoadKV(messages(), timeout=60, metadata=w.metadata)

    def release(self, session_id: str, timeout_s: float = 5.0) -> None:
        """Free the session on every worker (best effort: a dead worker holds nothing), once
        the loads queued before it have gone out: a load that reached a worker after the
        release would hold the session's KV again, and nothing would free it."""
        sent = threading.Event()
        self._loads.put(sent)
        if not sent.wait(timeout_s):
            log.warning("release of %r: queued KV loads did not drain", session_id)
        for w in self.workers:
            try:
                w.stub.Release(
                    attn_pb2.ReleaseRequest(session_id=session_id), timeout=5, metadata=w.metadata
                )
            except grpc.RpcError as exc:
                log.warning("release of %r on %s failed: %s", session_id, w.address, exc)

    def truncate(self, session_id: str, n: int, timeout_s: float = 5.0) -> None:
        """Keep the session's first n positions on every worker and layer (a speculative
        rollback), after every queued load has gone out (a rollback may follow the prefill
        it loads). One call per worker, all at once. PoolKVLost if a worker holds no or
        too little KV for it (rebuild it), PoolUnavailable if a worker does not answer."""
        self.flush(timeout_s)
        request = attn_pb2.TruncateRequest(session_id=session_id, n=n)
        calls = [
            (w, w.stub.Truncate.future(request, timeout=timeout_s, metadata=w.metadata))
            for w in self.workers
        ]
        lost, down = [], []
        for w, call in calls:
            try:
                call.result()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                detail = f"{w.address}: {code} {exc.details() if hasattr(exc, 'details') else exc}"
                kv_gone = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
                (lost if code in kv_gone else down).append(detail)
        if down:
            raise PoolUnavailable(f"truncating {session_id!r} failed: {'; '.join(down)}")
        if lost:
            raise PoolKVLost({session_id}, "; ".join(lost))

    def stats(self) -> list[attn_pb2.StatsReply]:
        return [w.stats(timeout=5) for w in self.workers]

    def close(self) -> None:
        self._drop_lanes()
        for w in self.workers:
            w.channel.close()
