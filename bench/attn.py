"""`python -m bench.attn`: decode with local attention vs attention offloaded to a Lamina
attention pool vs offloaded + ping-pong pipelining, side by side in one run.

The compute side is this process: the cloud's model (qwen15, Qwen2.5-Coder-1.5B), its upper
half [split, L) as cloud_ctx loads it (`load_upper_half`, bf16, split = L // 2), one torch
thread. The pool is a real 2-worker `services.attention_pool.main` (one process per worker,
one torch thread each, KV heads split between them), on loopback.

Per (batch B, context l), for each mode:

- local: `DecoderModel.run_rows` with one `SequenceKV` per session (what `LocalRunner` runs),
  its decode attention switched to the pool's kernel (`partial_attention.decode_attention`,
  `grouped_attend_local`), so both sides run the same attention kernel;
- offload: `OffloadRunner(micro_batches=1)`, every attention in the pool;
- offload-mb2: `OffloadRunner(micro_batches=2)`, two micro-batches in two threads (ping-pong);

B sessions get l positions of KV without a prefill (random k / v of the right shape: local
mode appends to each SequenceKV at every layer, offload modes send `KVLoad`s for every layer
and `flush()`; the KV's content does not change what a decode step costs), then one warm-up
decode step and S timed steps (one random hidden row per session, positions l, l+1, ...).
S shrinks for slow configurations (`--step-budget-s`); a configuration whose step is
predicted (from the previous batch size at the same l, linearly in B) to exceed
`--max-step-s`, or that would start after `--deadline-s`, is skipped and listed as such.

Also measured: payload bytes per token per layer on the pool link (PoolClient.traffic) vs
Lamina's (2 + 2/G)·e·d, the protobuf-serialized size of the same messages, compute-side
memory (KV bytes and RSS) vs pool memory as sessions grow, the loopback bandwidth, Lamina's
minimum-bandwidth formula with this run's measured MTIME / ATIME and with the H100 / H20
roofline, and the rotational-staggering simulation (`schedule.sweep`) with measured slices.

Writes docs/bench/attn.md, attn.json, attn_throughput.png, attn_memory.png.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch

from bench.machine import cpu_name

OUT = Path("docs/bench")
MODEL = "qwen15"
MODES = ("local", "offload", "offload-mb2")
TARGET = (16, 2048)  # (B, l) of issue 12's goal: offload within 15 % of local
ROW_SCALE = 1.0  # hidden rows ~ N(0, 1): the layers' RMSNorm makes the scale irrelevant to cost


# -- pure helpers (tested) -----------------------------------------------------------------


def parse_ints(text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8)."""
    out = tuple(int(x) for x in text.split(",") if x.strip())
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return out


def choose_steps(warmup_s: float, budget_s: float, min_steps: int, max_steps: int) -> int:
    """Timed steps that fit `budget_s` at the warm-up step's pace, within [min, max]."""
    if warmup_s <= 0:
        return max_steps
    return max(min_steps, min(max_steps, int(budget_s / warmup_s)))


def predict_step_s(prev: tuple[int, float] | None, batch: int) -> float | None:
    """Step time at `batch` from (batch, step s) of a smaller batch, linear in B (an upper
    bound: the dense part grows sublinearly in B, attention linearly)."""
    if prev is None:
        return None
    b0, t0 = prev
    return t0 * batch / b0


def per_token_layer(nbytes: int, tokens: int, layers: int) -> float:
    return nbytes / (tokens * layers) if tokens and layers else float("nan")


def grouped_attend_local(layer, q, k, v, segments) -> torch.Tensor:
    """`DecoderLayer.attend_local` with the pool's decode kernel: append each segment's k, v
    to its SequenceKV, then every one-row (decode) segment attends through
    `partial_attention.decode_attention` in one call; multi-row segments (prefill) through
    the model's `attention`. q [T, H, hd] -> [T, H, hd] in q's dtype."""
    from tandem.runtime.model import attention
    from tandem.runtime.partial_attention import decode_attention

    scale = layer.cfg.attn_scale
    out = torch.empty_like(q)
    starts, caches = [], []
    for seg in segments:
        rows = slice(seg.start, seg.start + seg.count)
        if seg.kv.length(layer.index) != seg.start_pos:
            raise RuntimeError(f"layer {layer.index}: cache and rows disagree")
        kk, vv = seg.kv.append(layer.index, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
        if seg.count == 1:
            starts.append(seg.start)
            caches.append((kk, vv))
        else:
            out[rows] = attention(q[rows], kk, vv, scale, layer.window)
    if len(starts) == q.shape[0]:
        out.copy_(decode_attention(q, caches, scale))
    elif starts:
        idx = torch.tensor(starts)
        out[idx] = decode_attention(q[idx], caches, scale).to(q.dtype)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- results -------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (mode, B, l): S timed decode steps after one warm-up step."""

    mode: str
    batch: int
    context: int
    steps: int = 0
    step_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    fill_s: float | None = None
    attn_s: float | None = None  # per step: local attention (incl. append) or pool call time
    pool_calls: int = 0  # per step
    wire_bytes: int = 0  # payload bytes on the pool link during the timed steps
    compute_cores: float | None = None  # this process's CPU s / wall s during the timed steps
    pool_cores: float | None = None  # the workers' CPU s / wall s
    skipped: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.step_s) and self.error is None and self.skipped is None

    @property
    def mean_step_s(self) -> float | None:
        return statistics.fmean(self.step_s) if self.step_s else None

    @property
    def tok_s(self) -> float | None:
        m = self.mean_step_s
        return self.batch / m if m else None

    @property
    def dense_s(self) -> float | None:
        """Per step: the non-attention part (step - attention; for mb2 not separable)."""
        m = self.mean_step_s
        if m is None or self.attn_s is None or self.mode == "offload-mb2":
            return None
        return m - self.attn_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_step_s=self.mean_step_s, tok_s=self.tok_s, dense_s=self.dense_s)
        return d


@dataclass
class MemRow:
    sessions: int
    context: int
    logical_kv_bytes: int  # sessions * positions * bytes per position (over the upper layers)
    local_kv_bytes: int  # sum of SequenceKV.nbytes() (allocated, with doubling)
    local_rss: int  # compute process RSS holding the sessions' KV
    local_rss_delta: int
    offload_rss: int  # compute process RSS while the sessions live in the pool
    offload_rss_delta: int
    pool_kv_bytes: int  # sum over workers of StatsReply.kv_bytes
    pool_rss: int  # the workers' RSS (summed)


# -- the pool process ----------------------------------------------------------------------


class PoolProcess:
    """`services.attention_pool.main` as a child process; addresses and worker pids from its
    banner."""

    def __init__(self, workers: int, capacity_mb: float, log_dir: Path) -> None:
        from tandem.launch import ServiceProcess

        self.svc = ServiceProcess.start(
            "attention_pool",
            [
                *("services.attention_pool.main", "--model", MODEL),
                *("--workers", str(workers), "--port", "0", "--metrics-port", "0"),
                *("--capacity-mb", f"{capacity_mb:g}", "--threads", "1"),
            ],
            log_dir,
            env={"TANDEM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        )
        self.addresses: list[str] = []
        self.worker_pids: list[int] = []

    def wait(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.svc.check()
            text = self.svc.log_path.read_text()
            m = re.search(r"--attention-pool (\S+)", text)
            if m:
                self.addresses = m.group(1).split(",")
                self.worker_pids = [int(p) for p in re.findall(r"  worker \d+: .* pid (\d+)", text)]
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"attention pool not ready after {timeout_s:.0f} s:\n{text}")
            time.sleep(0.2)

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.worker_pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for pid in self.worker_pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        self.svc.stop(grace_s=15)


def rss() -> int:
    return psutil.Process().memory_info().rss


def trimmed_rss() -> int:
    """RSS after a GC and glibc's malloc_trim (freed heap pages back to the OS)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss()


def time_call(fn, repeats: int, *args) -> float:
    """ms per call of fn(*args), after 3 untimed calls."""
    for _ in range(3):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - t0) / repeats * 1e3


def loopback_bandwidth(nbytes: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """Raw TCP throughput over 127.0.0.1 (bytes/s), one stream, this process to itself."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while got[0] < nbytes:
                data = conn.recv(chunk)
                if not data:
                    break
                got[0] += len(data)

    th = threading.Thread(target=sink, daemon=True)
    th.start()
    buf = b"\0" * chunk
    with socket.create_connection(srv.getsockname()) as c:
        t0 = time.perf_counter()
        for _ in range(nbytes // chunk):
            c.sendall(buf)
        th.join(30)
        dt = time.perf_counter() - t0
    srv.close()
    return got[0] / dt


# -- the measurement -----------------------------------------------------------------------


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        from services.cloud_ctx.offload import OffloadRunner
        from services.cloud_ctx.weights import load_upper_half
        from tandem.clients.pool import PoolClient, PoolShape
        from tandem.models.registry import ModelRegistry

        self.a = a
        t0 = time.perf_counter()
        max_ctx = max(4096, max(a.contexts) + a.max_steps + 8, a.mem_context + 8)
        self.upper = load_upper_half(ModelRegistry().get(MODEL), None, "bf16", max_ctx)
        self.load_s = time.perf_counter() - t0
        self.model = self.upper.model
        cfg = self.model.cfg
        self.cfg = cfg
        self.split = self.upper.split
        self.layers = range(self.split, cfg.n_layers)
        self.n_layers = len(self.layers)
        self.dtype = self.model.dtype
        self._attn_s = 0.0
        self._install_attention_timer()
        log_dir = Path(tempfile.mkdtemp(prefix="tandem-bench-attn-"))
        self.pool_proc = PoolProcess(a.workers, a.capacity_mb, log_dir)
        self.pool = None
        self.runners: dict[str, OffloadRunner] = {}
        self._make_pool = lambda: PoolClient(
            self.pool_proc.addresses,
            PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.dtype),
        )
        self._runner = lambda mb: OffloadRunner(self.model, self.split, self.pool, micro_batches=mb)
        self._kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fill_rates: list[float] = []

    def connect(self) -> None:
        self.pool_proc.wait()
        self.pool = self._make_pool()
        self.runners = {"offload": self._runner(1), "offload-mb2": self._runner(2)}

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        if self.pool is not None:
            self.pool.close()
        self.pool_proc.stop()

    def _install_attention_timer(self) -> None:
        """Local attention with the pool's kernel, timed (KV append + attention) per layer:
        each upper layer's `attend_local` becomes `grouped_attend_local` (an instance
        attribute shadows the method; nothing else changes)."""
        for i in self.layers:
            layer = self.model.layers[i]

            def orig(q, k, v, segments, _layer=layer):
                return grouped_attend_local(_layer, q, k, v, segments)

            def timed(q, k, v, segments, _orig=orig):
                t0 = time.perf_counter()
                try:
                    return _orig(q, k, v, segments)
                finally:
                    self._attn_s += time.perf_counter() - t0

            layer.attend_local = timed

    # -- KV without a prefill --------------------------------------------------------------

    def random_kv(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One k, v pair [l, KVH, hd] reused by every session and layer (content is
        irrelevant to the cost; N(0, 1) like normalised keys / values)."""
        if context not in self._kv_cache:
            g = torch.Generator().manual_seed(context)
            shape = (context, self.cfg.n_kv_heads, self.cfg.head_dim)
            k = torch.randn(shape, generator=g).to(self.dtype)
            v = torch.randn(shape, generator=g).to(self.dtype)
            self._kv_cache = {context: (k, v)}
        return self._kv_cache[context]

    def fill_local(self, batch: int, context: int):
        k, v = self.random_kv(context)
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, l, hd]
        kvs = []
        for _ in range(batch):
            kv = self.model.new_kv(first_layer=self.split)
            for layer in self.layers:
                kv.append(layer, kt, vt)
            kvs.append(kv)
        return kvs

    def fill_pool(self, sids: Sequence[str], context: int) -> None:
        from tandem.clients.pool import KVLoad

        k, v = self.random_kv(context)
        before = self.pool.traffic.loaded
        t0 = time.perf_counter()
        for i, sid in enumerate(sids):
            self.pool.load_kv([KVLoad(sid, layer, 0, k, v) for layer in self.layers])
            if i % 4 == 3:
                self.pool.flush(120)
        self.pool.flush(120)
        dt = time.perf_counter() - t0
        self.fill_rates.append((self.pool.traffic.loaded - before) / dt)
        held = sum(s.sessions for s in self.pool.stats())
        want = len(sids) * len(self.pool.workers)
        if held < want:
            raise RuntimeError(f"pool holds {held} worker-sessions after loading, want {want}")

    def release(self, sids: Sequence[str]) -> None:
        for sid in sids:
            self.pool.release(sid)

    def rows(self, batch: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [
            (torch.randn(1, self.cfg.hidden_size, generator=g) * ROW_SCALE).to(self.dtype)
            for _ in range(batch)
        ]

    # -- one configuration -----------------------------------------------------------------

    def trial(self, mode: str, batch: int, context: int, tag: str) -> Trial:
        if mode == "local":
            return LocalTrial(self, batch, context)
        return OffloadTrial(self, self.runners[mode], batch, context, tag)

    def measure(self, modes: Sequence[str], batch: int, context: int) -> list[Cell]:
        """All `modes` at one (B, l): every mode's sessions are prepared and warmed up, then
        the timed steps run round-robin (mode order rotating every step), so drift on a
        shared machine hits every mode alike."""
        a = self.a
        cells = {m: Cell(m, batch, context) for m in modes}
        trials = {m: self.trial(m, batch, context, f"{m}-b{batch}-l{context}") for m in modes}
        acc = {m: {"attn": 0.0, "calls": 0, "cpu": 0.0, "pool": 0.0, "wall": 0.0} for m in modes}
        live: list[str] = []

        def fail(m: str, exc: Exception) -> None:
            cells[m].error = f"{type(exc).__name__}: {exc}"
            print(f"  ERROR {m} B={batch} l={context}: {cells[m].error}", flush=True)
            if m in live:
                live.remove(m)

        try:
            for m in modes:
                try:
                    t0 = time.perf_counter()
                    trials[m].prepare()
                    cells[m].fill_s = time.perf_counter() - t0
                    live.append(m)
                except Exception as exc:  # noqa: BLE001 - a bench row, not a crash
                    fail(m, exc)
            for m in list(live):
                try:
                    t0 = time.perf_counter()
                    trials[m].step(0)  # warm-up: also grows every KV buffer past l (doubling)
                    cells[m].warmup_s = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    fail(m, exc)
            warm = max((cells[m].warmup_s or 0.0 for m in live), default=0.0)
            n = choose_steps(warm, a.step_budget_s, a.min_steps, a.max_steps)
            tr = self.pool.traffic
            for s in range(1, n + 1):
                k = s % max(1, len(live))
                for m in live[k:] + live[:k]:
                    sent0, recv0, calls0, call_s0 = tr.sent, tr.received, tr.calls, tr.call_s
                    self._attn_s = 0.0
                    cpu0, pool0 = time.process_time(), self.pool_proc.cpu_s()
                    t0 = time.perf_counter()
                    try:
                        trials[m].step(s)
                    except Exception as exc:  # noqa: BLE001
                        fail(m, exc)
                        continue
                    dt = time.perf_counter() - t0
                    c, st = cells[m], acc[m]
                    c.step_s.append(dt)
                    st["wall"] += dt
                    st["cpu"] += time.process_time() - cpu0
                    st["pool"] += self.pool_proc.cpu_s() - pool0
                    if m == "local":
                        st["attn"] += self._attn_s
                    else:
                        st["attn"] += tr.call_s - call_s0
                        st["calls"] += tr.calls - calls0
                        c.wire_bytes += (tr.sent - sent0) + (tr.received - recv0)
            for m in live:
                c, st = cells[m], acc[m]
                c.steps = len(c.step_s)
                c.attn_s = st["attn"] / c.steps
                c.pool_calls = round(st["calls"] / c.steps)
                c.compute_cores = st["cpu"] / st["wall"]
                c.pool_cores = st["pool"] / st["wall"]
        finally:
            for m in modes:
                try:
                    trials[m].cleanup()
                except Exception as exc:  # noqa: BLE001
                    print(f"  cleanup of {m} B={batch} l={context} failed: {exc}", flush=True)
            gc.collect()
        return [cells[m] for m in modes]

    def warm(self) -> None:
        """One step of each mode before anything is measured: pages the weights in, opens
        the gRPC streams (one per worker per thread), warms the allocator."""
        for mode, b in (("local", 2), ("offload", 2), ("offload-mb2", 2)):
            trial = self.trial(mode, b, 64, f"warm-{mode}")
            try:
                trial.prepare()
                trial.step(0)
            finally:
                trial.cleanup()
        gc.collect()

    # -- memory as sessions grow -----------------------------------------------------------

    def memory(self, counts: Sequence[int], context: int) -> list[MemRow]:
        """Compute-side RSS while N sessions live here (local) or in the pool (offload),
        after one decode step; freed heap memory is handed back (malloc_trim) before each
        baseline so the deltas are the sessions' own."""
        out = []
        per_pos = 2 * self.cfg.n_kv_heads * self.cfg.head_dim * 2 * self.n_layers
        for n in counts:
            base = trimmed_rss()
            local = LocalTrial(self, n, context)
            local.prepare()
            local.step(0)
            kv_bytes = sum(kv.nbytes() for kv in local.kvs)
            local_rss = rss()
            local.cleanup()
            off_base = trimmed_rss()
            off = OffloadTrial(self, self.runners["offload"], n, context, f"mem{n}")
            try:
                off.prepare()
                off.step(0)
                gc.collect()
                off_rss = rss()
                pool_kv = sum(s.kv_bytes for s in self.pool.stats())
                pool_rss = self.pool_proc.rss()
            finally:
                off.cleanup()
            row = MemRow(
                sessions=n,
                context=context,
                logical_kv_bytes=n * context * per_pos,
                local_kv_bytes=kv_bytes,
                local_rss=local_rss,
                local_rss_delta=local_rss - base,
                offload_rss=off_rss,
                offload_rss_delta=off_rss - off_base,
                pool_kv_bytes=pool_kv,
                pool_rss=pool_rss,
            )
            print(
                f"  memory N={n}: local KV {kv_bytes / 2**20:.1f} MiB, RSS "
                f"{local_rss / 2**20:.0f} ({(local_rss - base) / 2**20:+.1f}) MiB; offload RSS "
                f"{off_rss / 2**20:.0f} ({(off_rss - off_base) / 2**20:+.1f}) MiB, pool KV "
                f"{pool_kv / 2**20:.1f} MiB, worker RSS {pool_rss / 2**20:.0f} MiB",
                flush=True,
            )
            out.append(row)
        trimmed_rss()
        return out

    # -- attention kernels -----------------------------------------------------------------

    def kernels(self, contexts: Sequence[int], repeats: int = 30) -> list[dict]:
        """ms per (session, layer) of one decode row's attention, in this process, one
        thread: the kernel both sides run (`decode_attention`) over all KV heads (local) and
        over one worker's KV heads (what each worker runs, in parallel), and the model's
        bf16 SDPA with GQA (`model.attention`, what local decode ran before) for reference."""
        from tandem.runtime.model import attention
        from tandem.runtime.partial_attention import decode_attention

        cfg, dt = self.cfg, self.dtype
        kvh, hd, g = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        wk = kvh // self.a.workers
        out = []
        for ctx in contexts:
            q = torch.randn(1, cfg.n_heads, hd).to(dt)
            k = torch.randn(kvh, ctx + 1, hd).to(dt)
            v = torch.randn(kvh, ctx + 1, hd).to(dt)
            row = {
                "context": ctx,
                "worker_kv_heads": wk,
                "local_ms": time_call(decode_attention, repeats, q, [(k, v)], cfg.attn_scale),
                "worker_ms": time_call(
                    decode_attention, repeats, q[:, : wk * g], [(k[:wk], v[:wk])], cfg.attn_scale
                ),
                "sdpa_ms": time_call(attention, repeats, q, k, v, cfg.attn_scale, None),
            }
            out.append(row)
            print(
                f"  kernel l={ctx}: decode_attention all heads {row['local_ms']:.3f} ms, one "
                f"worker ({wk} kv heads) {row['worker_ms']:.3f} ms; SDPA "
                f"{row['sdpa_ms']:.3f} ms per session-layer",
                flush=True,
            )
        return out

    # -- protobuf framing ------------------------------------------------------------------

    def framing(self, batch: int, context: int) -> dict:
        """Serialized size of one layer's Attend traffic (one packed request and its reply
        per worker, as the client builds them) for `batch` decode rows, vs their tensor
        payload; plus gRPC's 5-byte message prefix. HTTP/2 frame headers (9 bytes per DATA
        frame) are not counted."""
        from tandem_proto.attn.v1 import attn_pb2

        g, hd = self.cfg.n_heads // self.cfg.n_kv_heads, self.cfg.head_dim
        payload = serialized = 0
        tag = f"offload-b{batch}-l{context}"
        for w in self.pool.workers:
            kvh = w.kv_end - w.kv_start
            msgs = [
                attn_pb2.AttendRequest(
                    call_id=10**6,
                    layer=self.cfg.n_layers - 1,
                    kv_head_start=w.kv_start,
                    kv_head_end=w.kv_end,
                    dtype="bf16",
                    session_ids=[f"{tag}-{i}" for i in range(batch)],
                    start_positions=[context] * batch,
                    rows=[1] * batch,
                    qkv=bytes(batch * (kvh * g + 2 * kvh) * hd * 2),
                ),
                attn_pb2.AttendReply(
                    call_id=10**6,
                    layer=self.cfg.n_layers - 1,
                    packed_out=bytes(batch * kvh * g * hd * 2),
                    compute_ms=1.0,
                ),
            ]
            payload += batch * (2 * kvh * g * hd * 2 + 2 * kvh * hd * 2)
            serialized += sum(m.ByteSize() + 5 for m in msgs)
        return {
            "batch": batch,
            "context": context,
            "payload_per_token_layer": payload / batch,
            "serialized_per_token_layer": serialized / batch,
        }


class Trial:
    def prepare(self) -> None: ...

    def step(self, s: int) -> None: ...

    def cleanup(self) -> None: ...


class LocalTrial(Trial):
    """Sessions' KV in SequenceKVs here; `DecoderModel.run_rows` as LocalRunner calls it."""

    def __init__(self, bench: Bench, batch: int, context: int) -> None:
        self.b, self.batch, self.context = bench, batch, context
        self.kvs: list = []

    def prepare(self) -> None:
        self.kvs = self.b.fill_local(self.batch, self.context)

    @torch.inference_mode()
    def step(self, s: int) -> None:
        rows = self.b.rows(self.batch, s)
        items = [(kv, self.context + s, r) for kv, r in zip(self.kvs, rows, strict=True)]
        self.b.model.run_rows(items, self.b.split, self.b.cfg.n_layers)

    def cleanup(self) -> None:
        self.kvs = []


class OffloadTrial(Trial):
    """Sessions' KV in the pool; `OffloadRunner.run_rows` (decode rows attend remotely)."""

    def __init__(self, bench: Bench, runner, batch: int, context: int, tag: str) -> None:
        self.b, self.runner, self.context = bench, runner, context
        self.batch = batch
        self.sids = [f"{tag}-{i}" for i in range(batch)]

    def prepare(self) -> None:
        self.b.fill_pool(self.sids, self.context)

    def step(self, s: int) -> None:
        rows = self.b.rows(self.batch, s)
        self.runner.run_rows(
            [(sid, self.context + s, r) for sid, r in zip(self.sids, rows, strict=True)]
        )

    def cleanup(self) -> None:
        self.b.release(self.sids)


# -- analysis (pure, from the JSON data) ------------------------------------------------------


def cell_index(cells: Sequence[dict]) -> dict[tuple[str, int, int], dict]:
    return {(c["mode"], c["batch"], c["context"]): c for c in cells}


def upper_shape(n_layers: int):
    """QWEN15 restricted to the offloaded layers (the formula's L = the pool's layers)."""
    from services.attention_pool.lamina import QWEN15

    return replace(QWEN15, name=f"qwen15 upper {n_layers}", n_layers=n_layers)


def measured_bandwidth(cells: Sequence[dict], n_layers: int, alpha: float, links) -> list:
    """Lamina's BW_min with this run's local-mode MTIME (step - attention) and ATIME
    (attention incl. KV append), for the offloaded layers."""
    from services.attention_pool.lamina import bandwidth_row

    shape = upper_shape(n_layers)
    rows = []
    for c in sorted(cells, key=lambda c: (c["context"], c["batch"])):
        if c["mode"] != "local" or not c["step_s"] or c["error"] or c["dense_s"] is None:
            continue
        rows.append(
            bandwidth_row(
                shape, c["batch"], c["dense_s"], c["attn_s"], alpha, c["context"], 1, links
            )
        )
    return rows


def pick_schedule_cell(cells: Sequence[dict], want: tuple[int, int]) -> dict | None:
    idx = cell_index(cells)
    c = idx.get(("offload", *want))
    if c and c["step_s"] and not c["error"]:
        return c
    done = [c for c in cells if c["mode"] == "offload" and c["step_s"] and not c["error"]]
    return max(done, key=lambda c: (c["batch"] * c["context"], c["batch"]), default=None)


def _f(x: float | None, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _status(c: dict | None) -> str | None:
    if c is None:
        return "not run"
    if c["skipped"]:
        return "skipped"
    if c["error"]:
        return "error"
    return None


def side_by_side(data: dict) -> str:
    idx = cell_index(data["cells"])
    a = data["meta"]["args"]
    head = ["l", "B"] + [f"{m} tok/s" for m in MODES] + [f"{m} ms/step" for m in MODES]
    head += ["offload / local", "mb2 / offload", "mb2 / local"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in a["contexts"]:
        for b in a["batches"]:
            cs = [idx.get((m, b, ctx)) for m in MODES]
            tok = [c["tok_s"] if c and not _status(c) else None for c in cs]
            ms = [c["mean_step_s"] * 1e3 if c and not _status(c) else None for c in cs]
            cells = [str(ctx), str(b)]
            cells += [
                _f(t) if t is not None else (_status(c) or "-")
                for t, c in zip(tok, cs, strict=True)
            ]
            cells += [_f(x, ".0f") for x in ms]
            cells += [
                _f(ratio(tok[1], tok[0]), ".2f"),
                _f(ratio(tok[2], tok[1]), ".2f"),
                _f(ratio(tok[2], tok[0]), ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(data: dict) -> str:
    n_layers = data["meta"]["layers"][1] - data["meta"]["layers"][0]
    head = ["mode", "B", "l", "steps", "ms/step (min)", "attn ms/step", "dense ms/step"]
    head += ["compute cores", "pool cores", "fill s", "B/token/layer", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in data["cells"]:
        note = c["skipped"] or c["error"] or ""
        if not c["step_s"]:
            cells = [c["mode"], str(c["batch"]), str(c["context"])] + ["-"] * 8 + [note]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        bpt = per_token_layer(c["wire_bytes"], c["batch"] * c["steps"], n_layers)
        cells = [
            c["mode"],
            str(c["batch"]),
            str(c["context"]),
            str(c["steps"]),
            f"{c['mean_step_s'] * 1e3:.0f} ({min(c['step_s']) * 1e3:.0f})",
            _f(c["attn_s"] * 1e3 if c["attn_s"] is not None else None, ".0f"),
            _f(c["dense_s"] * 1e3 if c["dense_s"] is not None else None, ".0f"),
            _f(c["compute_cores"], ".2f"),
            _f(c["pool_cores"], ".2f"),
            _f(c["fill_s"], ".1f"),
            "-" if c["mode"] == "local" else f"{bpt:.0f}",
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def traffic_table(data: dict) -> str:
    t = data["traffic"]
    n_layers = data["meta"]["layers"][1] - data["meta"]["layers"][0]
    head = ["mode", "B", "l", "tokens x layers", "payload bytes", "measured B/token/layer"]
    head += ["exact", "(2 + 2/G)·e·d", "measured / formula"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in data["cells"]:
        if c["mode"] == "local" or not c["step_s"] or c["error"]:
            continue
        tl = c["batch"] * c["steps"] * n_layers
        m = per_token_layer(c["wire_bytes"], c["batch"] * c["steps"], n_layers)
        lines.append(
            f"| {c['mode']} | {c['batch']} | {c['context']} | {tl} | {c['wire_bytes']} | "
            f"{m:.1f} | {t['exact']} | {t['formula']:.1f} | {m / t['formula']:.4f} |"
        )
    lines.append("")
    lines.append("| B | payload B/token/layer | protobuf + gRPC prefix B/token/layer | overhead |")
    lines.append("|---|---|---|---|")
    for f in t["framing"]:
        p, s = f["payload_per_token_layer"], f["serialized_per_token_layer"]
        lines.append(f"| {f['batch']} | {p:.0f} | {s:.1f} | {100 * (s / p - 1):.2f} % |")
    return "\n".join(lines)


def memory_table(data: dict) -> str:
    mib = 2**20
    head = ["sessions", "l", "logical KV MiB", "local: SequenceKV MiB", "local: RSS MiB"]
    head += ["offload: compute RSS MiB", "offload: pool kv_bytes MiB", "pool workers RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["memory"]:
        lines.append(
            f"| {r['sessions']} | {r['context']} | {r['logical_kv_bytes'] / mib:.1f} | "
            f"{r['local_kv_bytes'] / mib:.1f} | {r['local_rss'] / mib:.0f} "
            f"({r['local_rss_delta'] / mib:+.0f}) | {r['offload_rss'] / mib:.0f} "
            f"({r['offload_rss_delta'] / mib:+.0f}) | {r['pool_kv_bytes'] / mib:.1f} | "
            f"{r['pool_rss'] / mib:.0f} |"
        )
    return "\n".join(lines)


def kernel_table(data: dict) -> str:
    lines = [
        "| l | `decode_attention`, all KV heads (local) ms | `decode_attention`, one worker's "
        "KV heads ms | bf16 SDPA with GQA (the old local kernel) ms | SDPA / decode_attention |",
        "|---|---|---|---|---|",
    ]
    for k in data["kernels"]:
        lines.append(
            f"| {k['context']} | {k['local_ms']:.3f} | {k['worker_ms']:.3f} "
            f"({k['worker_kv_heads']} head) | {k['sdpa_ms']:.3f} | "
            f"{k['sdpa_ms'] / k['local_ms']:.1f} |"
        )
    return "\n".join(lines)


def summary_numbers(data: dict) -> dict:
    idx = cell_index(data["cells"])
    off, mb2, mb2l = [], [], []
    for (mode, b, ctx), c in idx.items():
        if mode != "local" or _status(c):
            continue
        o, p = idx.get(("offload", b, ctx)), idx.get(("offload-mb2", b, ctx))
        if o and not _status(o):
            off.append((ratio(o["tok_s"], c["tok_s"]), b, ctx))
            if p and not _status(p) and b > 1:
                mb2.append((ratio(p["tok_s"], o["tok_s"]), b, ctx))
                mb2l.append((ratio(p["tok_s"], c["tok_s"]), b, ctx))
    return {"offload_vs_local": off, "mb2_vs_offload": mb2, "mb2_vs_local": mb2l}


def _range(xs: list[tuple[float, int, int]]) -> str:
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    med = statistics.median(x for x, _, _ in xs)
    return (
        f"{lo[0]:.2f}x (B={lo[1]}, l={lo[2]}) to {hi[0]:.2f}x (B={hi[1]}, l={hi[2]}), "
        f"median {med:.2f}x"
    )


def discussion(data: dict) -> str:
    m = data["meta"]
    s = summary_numbers(data)
    roof = data["roofline"]
    target = next((x for x in s["offload_vs_local"] if (x[1], x[2]) == TARGET), None)
    lines = [
        f"- Target (issue 12): at B = {TARGET[0]}, l = {TARGET[1]}, offloaded decode within "
        f"15 % of local decode, same kernel on both sides: offload / local = "
        + (
            f"{target[0]:.2f} ({'met' if target[0] >= 0.85 else 'NOT met'})."
            if target
            else "not measured in this run."
        ),
        f"- Offload / local decode throughput over the measured grid: "
        f"{_range(s['offload_vs_local'])}.",
        f"- Ping-pong (micro_batches=2) / offload (micro_batches=1), B > 1: "
        f"{_range(s['mb2_vs_offload'])}; against local: {_range(s['mb2_vs_local'])}. "
        "(B = 1 cannot be split: mb2 is mb1 there.)",
    ]
    idx = cell_index(data["cells"])
    one = idx.get(("offload", 1, min(m["args"]["contexts"])))
    kern = {k["context"]: k for k in data.get("kernels", [])}
    if one and not _status(one) and one["pool_calls"] and one["context"] in kern:
        per_call = one["attn_s"] / one["pool_calls"] * 1e3
        lines.append(
            f"- Per-call cost: at B = 1, l = {one['context']} one `PoolClient.attend_rows` "
            f"(one layer, one packed message and one reply per worker) takes {per_call:.1f} "
            f"ms of wall time against {kern[one['context']]['worker_ms']:.2f} ms of a "
            "worker's attention kernel: the rest is Python and protobuf on both sides, the "
            "worker's event loop and compute-thread hop, gRPC over loopback and scheduling "
            "on contended cores. This fixed cost is why offload loses most at small B and "
            "short l."
        )
    wins = [
        (c["batch"], c["context"])
        for c in data["cells"]
        if c["mode"] == "offload-mb2"
        and not _status(c)
        and (lc := idx.get(("local", c["batch"], c["context"])))
        and not _status(lc)
        and c["tok_s"] > lc["tok_s"]
    ]
    if wins:
        lines.append(
            "- Where an offload mode matches or beats local ("
            + ", ".join(f"B={b} l={x}" for b, x in wins)
            + ") that is not Lamina's effect: both sides run the same kernel, but the pool "
            "runs it in two worker processes (up to two cores, see 'pool cores') while local "
            "mode attends on its one thread, and the compute process mostly waits "
            "('compute cores' below 1) during the pool's part."
        )
    lines.append(
        "- Noise: this is a shared 2-core machine; configurations with 3 timed steps (the "
        "large ones) moved by up to ~30 % between runs while developing this bench (e.g. "
        "offload / local at B=8, l=2048 was 1.15 in an earlier run). The small-B rows, the "
        "byte counts and the memory table are stable."
    )
    t = data["traffic"]
    measured = [
        per_token_layer(c["wire_bytes"], c["batch"] * c["steps"], m["layers"][1] - m["layers"][0])
        for c in data["cells"]
        if c["mode"] != "local" and c["step_s"] and not c["error"]
    ]
    if measured:
        lines.append(
            f"- Pool-link payload per token per layer: {min(measured):.1f} to "
            f"{max(measured):.1f} bytes in every offload configuration, against "
            f"(2 + 2/G)·e·d = {t['formula']:.0f} (qwen15: n_heads·head_dim = d, so the exact "
            "widths equal the formula). Payload only (PoolClient.traffic counts tensor bytes); "
            "protobuf fields and the gRPC prefix add the overhead in the framing table."
        )
    if data["memory"]:
        last = data["memory"][-1]
        lines.append(
            f"- Memory at {last['sessions']} sessions x {last['context']} positions: local "
            f"attention holds {last['local_kv_bytes'] / 2**20:.0f} MiB of KV on the compute "
            f"side (RSS {last['local_rss_delta'] / 2**20:+.0f} MiB); offloaded, the compute "
            f"side's RSS moved {last['offload_rss_delta'] / 2**20:+.0f} MiB and the pool held "
            f"{last['pool_kv_bytes'] / 2**20:.0f} MiB. The compute side's footprint stays the "
            "weights: its batch is no longer capped by KV memory."
        )
    lines += [
        "",
        "What one 2-core CPU box cannot show:",
        "",
        "- There is no memory-optimized device. The two pool workers run on the same two cores "
        "and the same memory bus as the compute side (3 busy processes on 2 cores: see the "
        "'cores' columns), so offloading adds serialization, copies and loopback gRPC without "
        "adding any memory bandwidth or compute. Lamina's gain comes from *different* hardware "
        "on the two sides (cheap HBM capacity for KV, FLOPs for the dense part) and larger "
        "batches than the compute device's memory allows; neither exists here.",
        "- The link is loopback TCP through gRPC/protobuf and Python, not RDMA with GPU-side "
        "polling (FHBN, 33 µs RTT): per-layer round trips cost far more relative to the work.",
        "- Local mode runs one torch thread; the offload modes use one compute thread (two "
        "threads for mb2, whose dense parts may also overlap each other) plus one thread per "
        "worker, so throughput ratios here compare unequal, contended CPU shares, not devices.",
        "- Ping-pong can only hide the pool's time behind the other micro-batch's dense part "
        "when there are idle cores to run both; with 2 cores shared by 3 processes the overlap "
        "is partial at best.",
        "",
        "What the numbers imply for a GPU + memory-node deployment (lamina.py, roofline):",
        "",
    ]
    lmax = max(x["context"] for x in roof)
    top = [r for r in roof if r["context"] == lmax]
    for r in top:
        shares = ", ".join(f"{n}: {v:.2f}" for n, v in r["links"])
        lines.append(
            f"- qwen15 (all 28 layers) on H100 + H20, B = {r['batch']}, l = {r['context']}: "
            f"MTIME {r['mtime_s'] * 1e3:.2f} ms, ATIME {r['atime_s'] * 1e3:.3f} ms, BW_min "
            f"{r['bw_min'] / 1e9:.1f} GB/s at alpha {r['alpha']} (share of the link: {shares})."
        )
    fit10 = [r["batch"] for r in top if dict(r["links"]).get("10 Gbit/s", 9) <= 1]
    big = data.get("llama_roofline") or []
    lines += [
        f"- The traffic per token is small and matches the formula exactly here ("
        f"{t['formula']:.0f} B per token per layer). What decides the link is the GPU step "
        f"time: qwen15's decode step is about {top[0]['mtime_s'] * 1e3:.1f} ms on an H100 "
        "(reading 3 GB of weights), so BW_min grows almost linearly in B. A 10 Gbit/s link "
        + (
            f"keeps alpha <= {top[0]['alpha']} only up to B = {max(fit10)}"
            if fit10
            else "is too slow at every B in the grid"
        )
        + f" at l = {lmax}; 400 Gbit/s (Lamina's RoCE) covers "
        + (
            "the whole grid."
            if all(dict(r["links"]).get("400 Gbit/s", 9) <= 1 for r in top)
            else "part of the grid."
        ),
    ]
    if big:
        lines.append(
            "- For comparison, LLaMA3-70B (Lamina's model) with the same roofline at l = "
            f"{lmax}: "
            + ", ".join(f"B = {r['batch']}: {r['bw_min'] / 1e9:.1f} GB/s" for r in big)
            + ". Its much longer MTIME per token makes the bandwidth per step cheaper "
            "relative to the work: a small model like qwen15 is the *harder* case for "
            "disaggregation's network, and its 1.5B weights fit any GPU next to the KV, so "
            "the KV-capacity gain (larger batches) is what would pay, at long contexts."
        )
    lines.append(
        "- The capacity argument is shown directly: offloaded, the compute side holds no KV "
        "(memory table), so sessions x context is bounded by the pool's memory, not the "
        "compute device's."
    )
    return "\n".join(lines)


def render(data: dict) -> str:
    m = data["meta"]
    a = m["args"]
    lay = m["layers"]
    sch = data["schedule"]
    out = [
        "# Attention offloading (Lamina): local vs pool vs pool + ping-pong",
        "",
        f"`python -m bench.attn` (`make bench-attn`), one run, {m['wall_s']:.0f} s wall. "
        f"Machine: {m['machine']}.",
        "",
        "## Setup",
        "",
        f"- Model: {m['model']} (Qwen2.5-Coder-1.5B), the cloud's upper half, layers "
        f"[{lay[0]}, {lay[1]}) as cloud_ctx loads it (`load_upper_half`, bf16, "
        f"{m['weights_mib']:.0f} MiB incl. LM head, loaded in {m['load_s']:.1f} s), in the "
        "bench process with **1 torch thread**.",
        f"- Attention pool: `services.attention_pool.main --workers {a['workers']} --threads 1` "
        f"(real processes, loopback gRPC, bf16 KV, {a['capacity_mb']:g} MiB per worker), "
        f"head-level partitioning: each worker holds {m['kv_heads_per_worker']} of "
        f"{m['n_kv_heads']} KV heads ({m['n_heads']} query heads, head_dim {m['head_dim']}).",
        "- Decode only, as in Lamina. B sessions get l positions of KV **without a prefill**: "
        "random k / v of the right shape (N(0, 1), one tensor reused for every session and "
        "layer). Local mode appends them to each session's `SequenceKV` at every layer; "
        "offload modes send one `KVLoad` per layer and `flush()`. The KV's content does not "
        "change what a decode step costs (same shapes, same ops).",
        f"- Per (B, l, mode): one warm-up decode step (it also grows every KV buffer past l; "
        f"both sides double), then S timed steps, S in [{a['min_steps']}, {a['max_steps']}] "
        f"so that S x warm-up <= {a['step_budget_s']:g} s. Each step: one random hidden row "
        "(N(0, 1); RMSNorm makes the scale irrelevant) per session, at positions l, l+1, ... "
        "tokens/s = B x S / time. The modes of one (B, l) hold their sessions at the same "
        "time and their timed steps run round-robin (the order rotates every step), so "
        "drift on this shared machine hits all modes alike.",
        "- Modes: **local** = `DecoderModel.run_rows` with per-session `SequenceKV` (what "
        "`LocalRunner` runs), decode attention through the pool's kernel (below); "
        "**offload** = `OffloadRunner(micro_batches=1)`; **offload-mb2** "
        "= `OffloadRunner(micro_batches=2)`, two micro-batches in two threads (ping-pong).",
        f"- Skips: a configuration whose step is predicted (previous B at the same l, linear "
        f"in B) to exceed {a['max_step_s']:g} s, or that would start after "
        f"{a['deadline_s']:g} s of grid time, is skipped (listed below).",
        f"- Loopback raw TCP, one stream: {m['loopback_bps'] / 1e9:.2f} GB/s; gRPC `LoadKV` "
        f"payload rate during the fills: {m['grpc_load_bps'] / 1e9:.2f} GB/s (median).",
        "",
        "## Decode throughput, side by side (one run)",
        "",
        side_by_side(data),
        "",
        "## Per configuration",
        "",
        "attn ms/step: local = time inside the layers' `attend_local` (KV append + "
        "`decode_attention`); offload = wall time of the `PoolClient.attend_rows` calls "
        "(pack, gRPC both ways, the workers' append + `decode_attention`, unpack). "
        "dense = step - attn (not separable for mb2, whose "
        "two threads overlap). cores = CPU seconds / wall seconds of this process (compute) "
        "and of the worker processes (pool) during the timed steps. B/token/layer = pool-link "
        "payload.",
        "",
        detail_table(data),
        "",
        "## Bytes per token per layer",
        "",
        "Measured from `PoolClient.traffic` over the timed steps: (sent + received) / "
        "(tokens x layers). Only tensor payload bytes are counted (q, k, v out; attention "
        "output back); protobuf fields, the gRPC 5-byte message prefix and HTTP/2 frames are "
        "not. The second table gives the serialized size of the same messages "
        "(`ByteSize()` + 5) for the session ids this bench uses.",
        "",
        traffic_table(data),
        "",
        "## Compute-side memory as sessions grow",
        "",
        f"N sessions at l = {a['mem_context']}, after one decode step (buffers doubled). "
        "Local: the sum of `SequenceKV.nbytes()` held by the compute side and the compute "
        "process's RSS (psutil; in brackets the change from the baseline just before, taken "
        "after `gc.collect()` + glibc `malloc_trim(0)`). Offload: the compute process's RSS "
        "while the same sessions live in the pool (it holds none of their KV by "
        "construction), the pool's `kv_bytes` (Stats, summed over workers) and the workers' "
        "RSS (summed; a worker keeps freed heap, so this is a high-water mark).",
        "",
        memory_table(data),
        "",
        "![memory](attn_memory.png)",
        "",
        "![throughput](attn_throughput.png)",
        "",
        "## Attention kernels, local vs pool worker",
        "",
        "Both sides run the same attention kernel: `tandem.runtime.partial_attention."
        "decode_attention` (one new row per sequence over per-sequence caches [KVH, L, hd]; "
        "grouped GQA: the G = 6 query heads of a KV head are G rows of one fp32 matmul "
        "against that head's K and V, no copies of K / V per query head; fp32 softmax). The "
        "pool's workers call it on their KV heads for every decode row of a packed Attend "
        "message; local mode calls it (`grouped_attend_local` in this bench) on all KV heads "
        "for the batch's decode rows. One decode row, one layer, in this process, one "
        "thread. With two workers in parallel, a session-layer's pool attention takes about "
        "one worker's time. The bf16 SDPA column is what `model.attention` (the runtime's "
        "local kernel until it switches) costs for the same work.",
        "",
        kernel_table(data),
        "",
        "## Lamina's minimum bandwidth with this run's MTIME and ATIME",
        "",
        f"BW_min = (2 + 2/G)·e·d·B·L / (alpha·[MTIME + ATIME]), alpha = {a['alpha']}, L = "
        f"{lay[1] - lay[0]} (the offloaded layers), MTIME = local mode's dense time per step, "
        "ATIME = local mode's attention time per step (this machine, 1 thread). 'share of X' "
        "= exact bytes per step / (alpha x step time) / X's rate: above 1 the link would "
        "inflate the step by more than alpha.",
        "",
        data["bandwidth_measured_md"],
        "",
        "The same formula with roofline times (lamina.evaluate: MTIME on an H100, ATIME on "
        "an H20, all 28 layers, peak FLOP/s and memory bandwidth), for comparison:",
        "",
        data["roofline_md"],
        "",
        "## Rotational staggered pipelining with measured slices",
        "",
    ]
    if sch:
        out += [
            f"`schedule.sweep` for n = 2..8 with this run's offload-mode slices at B = "
            f"{sch['batch']}, l = {sch['context']}: t_m = dense time per layer "
            f"{sch['t_m'] * 1e3:.3f} ms, t_a = pool call per layer {sch['t_a'] * 1e3:.3f} ms "
            f"({sch['layers']} layers, {sch['steps']} steps). n batches on n - 1 model "
            "replicas and one pool (the pool is one resource).",
            "",
            sch["md"],
            "",
            "With the pool sized by the rule t_a = t_m / (n - 1) (bubble-free):",
            "",
            sch["sized_md"],
            "",
            f"Measured ping-pong at that configuration: offload-mb2 / offload = "
            f"{_f(sch['measured_mb2'], '.2f')} (the simulation's n = 2 row assumes two "
            "independent resources; here both share 2 cores).",
        ]
    else:
        out.append("No offload configuration completed: no schedule table.")
    out += ["", "## Discussion", "", discussion(data), ""]
    skipped = [c for c in data["cells"] if c["skipped"] or c["error"]]
    if skipped:
        out += ["## Skipped or failed", ""]
        for c in skipped:
            out.append(
                f"- {c['mode']} B={c['batch']} l={c['context']}: {c['skipped'] or c['error']}"
            )
        out.append("")
    return "\n".join(out)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = data["meta"]["args"]
    ctxs = a["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(4.2 * len(ctxs), 3.6), squeeze=False)
    idx = cell_index(data["cells"])
    for ax, ctx in zip(axes[0], ctxs, strict=True):
        for mode, marker in zip(MODES, "os^", strict=True):
            pts = [
                (b, idx[(mode, b, ctx)]["tok_s"])
                for b in a["batches"]
                if (mode, b, ctx) in idx and not _status(idx[(mode, b, ctx)])
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_title(f"context l = {ctx}")
        ax.set_xlabel("batch B (sessions)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend()
    fig.suptitle("qwen15 upper half, decode: local vs attention pool vs pool + ping-pong")
    fig.tight_layout()
    fig.savefig(out / "attn_throughput.png", dpi=110)
    plt.close(fig)

    if data["memory"]:
        mem = data["memory"]
        n = [r["sessions"] for r in mem]
        mib = 2**20
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot(n, [r["local_rss"] / mib for r in mem], "o-", label="local: compute RSS")
        ax.plot(n, [r["offload_rss"] / mib for r in mem], "s-", label="offload: compute RSS")
        ax.plot(n, [r["local_kv_bytes"] / mib for r in mem], "o--", label="local: KV held")
        ax.plot(n, [r["pool_kv_bytes"] / mib for r in mem], "^--", label="offload: pool kv_bytes")
        ax.set_xlabel(f"sessions (l = {mem[0]['context']})")
        ax.set_ylabel("MiB")
        ax.set_title("KV memory: compute side vs pool")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "attn_memory.png", dpi=110)
        plt.close(fig)


# -- driver --------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    from services.attention_pool import lamina, schedule

    start = time.perf_counter()
    torch.set_num_threads(1)
    bench = Bench(a)
    cfg = bench.cfg
    print(
        f"loaded {MODEL} layers [{bench.split}, {cfg.n_layers}) in {bench.load_s:.1f} s; "
        "starting the pool",
        flush=True,
    )
    cells: list[Cell] = []
    mem: list[MemRow] = []
    framing: list[dict] = []
    kernels: list[dict] = []
    try:
        bench.connect()
        print(f"pool: {bench.pool_proc.addresses}", flush=True)
        loop_bps = loopback_bandwidth()
        bench.warm()
        if a.mem_sessions:
            print("memory ...", flush=True)
            mem = bench.memory(a.mem_sessions, a.mem_context)
        print("attention kernels ...", flush=True)
        kernels = bench.kernels(a.contexts)
        grid0 = time.perf_counter()
        last: dict[tuple[str, int], tuple[int, float]] = {}
        for ctx in a.contexts:
            for b in a.batches:
                run_modes, group = [], {}
                for mode in MODES:
                    pred = predict_step_s(last.get((mode, ctx)), b)
                    if time.perf_counter() - grid0 > a.deadline_s:
                        group[mode] = Cell(
                            mode, b, ctx, skipped=f"grid deadline {a.deadline_s:g} s"
                        )
                    elif pred is not None and pred > a.max_step_s:
                        why = f"predicted {pred:.1f} s/step > {a.max_step_s:g} s"
                        group[mode] = Cell(mode, b, ctx, skipped=why)
                    else:
                        run_modes.append(mode)
                if run_modes:
                    for cell in bench.measure(run_modes, b, ctx):
                        group[cell.mode] = cell
                        if cell.ok:
                            last[(cell.mode, ctx)] = (b, cell.mean_step_s)
                for mode in MODES:
                    cell = group[mode]
                    cells.append(cell)
                    print(
                        f"  l={ctx:5d} B={b:3d} {mode:12s} "
                        + (
                            f"{cell.tok_s:8.1f} tok/s  {cell.mean_step_s * 1e3:8.0f} ms/step "
                            f"x{cell.steps}  attn {cell.attn_s * 1e3:7.0f} ms  "
                            f"cores {cell.compute_cores:.2f}+{cell.pool_cores:.2f}"
                            if cell.ok
                            else (cell.skipped or cell.error or "")
                        ),
                        flush=True,
                    )
        for b in sorted({1, max(a.batches)}):
            framing.append(bench.framing(b, max(a.contexts)))
        heads = bench.pool.workers[0].kv_end - bench.pool.workers[0].kv_start
    finally:
        bench.close()
    n_layers = bench.n_layers
    tt = lamina.bytes_per_token_per_layer(lamina.QWEN15)
    grpc_bps = statistics.median(bench.fill_rates) if bench.fill_rates else float("nan")
    links = (
        lamina.LINK_10G,
        lamina.Link("loopback TCP (measured)", loop_bps),
        lamina.Link("gRPC LoadKV (measured)", grpc_bps),
    )
    cell_dicts = [c.as_dict() for c in cells]
    bw = measured_bandwidth(cell_dicts, n_layers, a.alpha, links)
    roof = [
        r
        for ctx in a.contexts
        for r in lamina.evaluate(
            lamina.QWEN15,
            a.batches,
            ctx,
            a.alpha,
            links=(lamina.LINK_10G, lamina.LINK_400G, links[1]),
        )
    ]
    llama = lamina.evaluate(lamina.LLAMA3_70B, a.batches, max(a.contexts), a.alpha)
    sch = None
    c = pick_schedule_cell(cell_dicts, a.schedule_at)
    if c is not None:
        t_m, t_a = c["dense_s"] / n_layers, c["attn_s"] / n_layers
        steps = max(c["steps"], 2)
        rows = schedule.sweep(range(2, 9), t_m, t_a, n_layers, steps, c["batch"])
        sized = schedule.sweep(range(2, 9), t_m, None, n_layers, steps, c["batch"])
        mb2 = cell_index(cell_dicts).get(("offload-mb2", c["batch"], c["context"]))
        sch = {
            "batch": c["batch"],
            "context": c["context"],
            "t_m": t_m,
            "t_a": t_a,
            "layers": n_layers,
            "steps": steps,
            "rows": [asdict(r) for r in rows],
            "sized_rows": [asdict(r) for r in sized],
            "md": schedule.report_table(rows),
            "sized_md": schedule.report_table(sized),
            "measured_mb2": ratio(mb2["tok_s"], c["tok_s"]) if mb2 and mb2["tok_s"] else None,
        }
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()}
    args["out"] = str(a.out)
    return {
        "meta": {
            "machine": f"{cpu_name()}, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__}",
            "model": MODEL,
            "layers": [bench.split, cfg.n_layers],
            "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "kv_heads_per_worker": heads,
            "weights_mib": bench.upper.nbytes / 2**20,
            "load_s": bench.load_s,
            "loopback_bps": loop_bps,
            "grpc_load_bps": grpc_bps,
            "compute_threads": 1,
            "wall_s": time.perf_counter() - start,
            "args": args,
        },
        "cells": cell_dicts,
        "traffic": {
            "formula": tt.formula,
            "exact": tt.total,
            "framing": framing,
        },
        "memory": [asdict(r) for r in mem],
        "kernels": kernels,
        "bandwidth_measured": [asdict(r) for r in bw],
        "bandwidth_measured_md": lamina.bandwidth_table(bw) if bw else "(no local rows)",
        "roofline": [asdict(r) for r in roof],
        "roofline_md": lamina.bandwidth_table(roof),
        "llama_roofline": [asdict(r) for r in llama],
        "schedule": sch,
    }


def parse_pair(text: str) -> tuple[int, int]:
    b, _, ctx = text.partition("x")
    return int(b), int(ctx)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=parse_ints, default=(1, 4, 8, 16, 32))
    p.add_argument("--contexts", type=parse_ints, default=(128, 512, 2048))
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--step-budget-s", type=float, default=6.0, help="timed steps per config")
    p.add_argument("--max-step-s", type=float, default=6.0, help="skip slower configs")
    p.add_argument("--deadline-s", type=float, default=360.0, help="grid time before skipping")
    p.add_argument("--mem-sessions", type=parse_ints, default=(1, 8, 32, 64))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--mem-context", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--capacity-mb", type=float, default=3072)
    p.add_argument(
        "--schedule-at", type=parse_pair, default=(16, 512), help="BxL for the schedule table"
    )
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.no_memory:
        a.mem_sessions = ()
    if a.min_steps < 1 or a.max_steps < a.min_steps:
        p.error("need 1 <= --min-steps <= --max-steps")
    return a


def write_reports(data: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn.json").write_text(json.dumps(data, indent=1) + "\n")
    md = render(data)
    (out / "attn.md").write_text(md)
    plot(data, out)
    return md


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    data = run(a)
    print(write_reports(data, a.out))
    print(f"wall {data['meta']['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
