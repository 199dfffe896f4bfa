"""Attention workers over real gRPC on 127.0.0.1: decode attention equals the model's own
attention over the full cache; Q-then-KV equals QKV; head partitions concatenate exactly;
Attend waits for LoadKV; errors; and the pool launcher as a real process tree."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from services.attention_pool.kv_store import KVStore
from services.attention_pool.metrics import AttnMetrics
from services.attention_pool.worker import (
    HAVE_KEY,
    AttentionWorkerServicer,
    ModelShape,
    decode,
    encode,
    start_attention_worker,
)
from tandem.runtime.model import attention
from tandem.transport.grpc_auth import bearer_metadata
from tandem_proto.attn.v1 import attn_pb2, attn_pb2_grpc

H, KVH, HD = 4, 2, 16  # 2 query heads per kv head
FIRST, LAYERS = 2, 2  # the workers hold layers 2 and 3
SCALE = HD**-0.5
BF16 = torch.bfloat16
ROOT = Path(__file__).resolve().parents[3]


def servicer(kv: tuple[int, int] = (0, KVH), capacity: int = 1 << 24, wait_s: float = 2.0):
    store = KVStore(FIRST, LAYERS, kv[0], kv[1], HD, BF16, capacity)
    metrics = AttnMetrics(CollectorRegistry())
    metrics.bind_store(store)
    return AttentionWorkerServicer(
        store, ModelShape(H, KVH, HD, SCALE), load_wait_s=wait_s, metrics=metrics
    )


@dataclass
class Seq:
    """A sequence's full K, V per layer (the reference) and random rows for new steps."""

    sid: str
    gen: torch.Generator
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [KVH, L, HD]
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def r(heads: int) -> torch.Tensor:
            return torch.randn(n, heads, HD, generator=self.gen).to(BF16)

        return r(H), r(KVH), r(KVH)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        start = self.k[layer].shape[1] if layer in self.k else 0
        empty = torch.empty(KVH, 0, HD, dtype=BF16)
        self.k[layer] = torch.cat([self.k.get(layer, empty), k.transpose(0, 1)], dim=1)
        self.v[layer] = torch.cat([self.v.get(layer, empty), v.transpose(0, 1)], dim=1)
        return start

    def expected(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return attention(q, self.k[layer], self.v[layer], SCALE, None)


def seqs(*ids: str) -> list[Seq]:
    return [Seq(sid, torch.Generator().manual_seed(i)) for i, sid in enumerate(ids)]


def item(sid, start, q=None, k=None, v=None, kv=(0, KVH), n=None):
    g = H // KVH
    return attn_pb2.SeqItem(
        session_id=sid,
        start_pos=start,
        n=n if n is not None else (q if q is not None else k).shape[0],
        q=b"" if q is None else encode(q[:, kv[0] * g : kv[1] * g], BF16),
        k=b"" if k is None else encode(k[:, kv[0] : kv[1]], BF16),
        v=b"" if v is None else encode(v[:, kv[0] : kv[1]], BF16),
    )


def request(call_id, layer, items, phase=attn_pb2.PHASE_QKV, kv=(0, KVH)):
    return attn_pb2.AttendRequest(
        call_id=call_id,
        layer=layer,
        kv_head_start=kv[0],
        kv_head_end=kv[1],
        dtype="bf16",
        phase=phase,
        items=items,
    )


def out_of(reply: attn_pb2.AttendReply, i: int, n: int, q_heads: int = H) -> torch.Tensor:
    return decode(reply.out[i], BF16, (n, q_heads, HD))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


class Worker:
    """A servicer on a free loopback port with a stub and one open Attend stream."""

    def __init__(self, svc: AttentionWorkerServicer) -> None:
        self.svc = svc

    async def __aenter__(self) -> Worker:
        self.running = await start_attention_worker(self.svc)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = attn_pb2_grpc.AttentionWorkerStub(self.channel)
        self.stream = self.stub.Attend()
        return self

    async def __aexit__(self, *exc) -> None:
        self.stream.cancel()
        await self.channel.close()
        await self.running.stop(0)

    async def attend(self, *messages: attn_pb2.AttendRequest) -> attn_pb2.AttendReply:
        """Send the messages (Q then KV, or one QKV) and read the one reply."""
        for m in messages:
            await self.stream.write(m)
        return await asyncio.wait_for(self.stream.read(), 10)

    async def load(self, loads: list[attn_pb2.LoadKVRequest]) -> int:
        return (await self.stub.LoadKV(iter(loads), timeout=10)).loaded


def load_msg(sid, layer, start, k, v, kv=(0, KVH)):
    return attn_pb2.LoadKVRequest(
        session_id=sid,
        layer=layer,
        kv_head_start=kv[0],
        kv_head_end=kv[1],
        dtype="bf16",
        start_pos=start,
        n=k.shape[0],
        k=encode(k[:, kv[0] : kv[1]], BF16),
        v=encode(v[:, kv[0] : kv[1]], BF16),
    )


def test_decode_matches_full_attention_and_phases_and_head_partitions():
    """(a) prefill rows + decode steps for 2 sessions batched in one message equal the model's
    attention over the full cache; (b) Q-then-KV equals the reference too; (c) two
    one-head workers concatenated equal the two-head worker."""

    async def main():
        async with (
            Worker(servicer()) as qkv,
            Worker(servicer()) as phased,
            Worker(servicer((0, 1))) as w0,
            Worker(servicer((1, 2))) as w1,
        ):
            ss = seqs("a", "b")
            call = 0
            for step, n in enumerate([3, 1, 1, 1, 1]):  # a 3-row catch-up, then decode
                for layer in (FIRST, FIRST + 1):
                    call += 1
                    new = {s.sid: s.rows(n + (s.sid == "b" and step == 0)) for s in ss}
                    starts = {s.sid: s.extend(layer, *new[s.sid][1:]) for s in ss}
                    items = [item(s.sid, starts[s.sid], *new[s.sid]) for s in ss]
                    r = await qkv.attend(request(call, layer, items))
                    assert (r.call_id, r.layer, list(r.errors)) == (call, layer, [])
                    q_only = [item(s.sid, starts[s.sid], q=new[s.sid][0]) for s in ss]
                    kv_only = [
                        item(s.sid, starts[s.sid], k=new[s.sid][1], v=new[s.sid][2]) for s in ss
                    ]
                    rp = await phased.attend(
                        request(call, layer, q_only, attn_pb2.PHASE_Q),
                        request(call, layer, kv_only, attn_pb2.PHASE_KV),
                    )
                    assert (rp.call_id, list(rp.errors)) == (call, [])
                    parts = []
                    for w, kv in ((w0, (0, 1)), (w1, (1, 2))):
                        its = [item(s.sid, starts[s.sid], *new[s.sid], kv=kv) for s in ss]
                        parts.append(await w.attend(request(call, layer, its, kv=kv)))
                    for i, s in enumerate(ss):
                        rows = new[s.sid][0].shape[0]
                        got = out_of(r, i, rows)
                        close(got, s.expected(layer, new[s.sid][0]))  # (a)
                        # (b) the phased path (partial + merge) and the decode kernel (one
                        # softmax) round differently: equal to the reference, not bitwise
                        close(out_of(rp, i, rows), s.expected(layer, new[s.sid][0]))
                        halves = [out_of(p, i, rows, H // 2) for p in parts]
                        assert torch.equal(torch.cat(halves, dim=1), got)  # (c)
            st = await qkv.stub.Stats(attn_pb2.StatsRequest())
            assert (st.sessions, st.first_layer, st.n_layers) == (2, FIRST, LAYERS)
            assert (st.kv_head_start, st.kv_head_end) == (0, KVH) and st.kv_bytes > 0
            st0 = await w0.stub.Stats(attn_pb2.StatsRequest())
            assert (st0.kv_head_start, st0.kv_head_end) == (0, 1)
            assert st0.kv_bytes * 2 == st.kv_bytes and st0.worker_id != st.worker_id
            text = generate_latest(qkv.svc.metrics.registry).decode()
            assert f'tandem_attn_attend_seconds_count{{layer="{FIRST}",worker="0"}} 5.0' in text
            assert "tandem_attn_kv_bytes" in text

    asyncio.run(main())


def test_load_kv_then_attend_and_attend_waits_for_the_load():
    """(d) prefill KV through LoadKV, then decode; an Attend sent before its load waits."""

    async def main():
        async with Worker(servicer(wait_s=5.0)) as w:
            a, b = seqs("a", "b")
            prefill = {s.sid: {layer: s.rows(6) for layer in (FIRST, FIRST + 1)} for s in (a, b)}
            for s in (a, b):
                for layer in (FIRST, FIRST + 1):
                    s.extend(layer, *prefill[s.sid][layer][1:])
            # a: loaded first, then attended
            loads = [load_msg("a", L, 0, *prefill["a"][L][1:]) for L in (FIRST, FIRST + 1)]
            assert await w.load(loads) == 2
            q, k, v = a.rows(1)
            start = a.extend(FIRST, k, v)
            r = await w.attend(request(1, FIRST, [item("a", start, q, k, v)]))
            assert not r.errors
            close(out_of(r, 0, 1), a.expected(FIRST, q))
            # b: the Attend (phased) goes out before any of its KV is loaded
            q, k, v = b.rows(1)
            start = b.extend(FIRST + 1, k, v)
            for m in (
                request(2, FIRST + 1, [item("b", start, q=q)], attn_pb2.PHASE_Q),
                request(2, FIRST + 1, [item("b", start, k=k, v=v)], attn_pb2.PHASE_KV),
            ):
                await w.stream.write(m)
            reply = asyncio.ensure_future(w.stream.read())
            await asyncio.sleep(0.3)
            assert not reply.done()  # waiting for the load
            t0 = time.perf_counter()
            loads = [load_msg("b", L, 0, *prefill["b"][L][1:]) for L in (FIRST, FIRST + 1)]
            assert await w.load(loads) == 2
            r = await asyncio.wait_for(reply, 5)
            assert time.perf_counter() - t0 < 2 and not r.errors
            close(out_of(r, 0, 1), b.expected(FIRST + 1, q))
            text = generate_latest(w.svc.metrics.registry).decode()
            assert 'tandem_attn_load_waits_total{outcome="ok",worker="0"} 1.0' in text

    asyncio.run(main())


def test_errors_release_mismatch_capacity_and_bad_arguments():
    """(e) NOT_FOUND for unknown / released sessions, FAILED_PRECONDITION with `have`,
    evictions in Stats, INVALID_ARGUMENT for a wrong head range."""
    row = 2 * KVH * HD * 2  # bytes of one position's K and V per layer

    async def main():
        async with Worker(servicer(capacity=2 * 64 * row, wait_s=0.3)) as w:
            (a,) = seqs("a")
            q, k, v = a.rows(2)
            r = await w.attend(request(1, FIRST, [item("a", 0, q, k, v)]))
            assert not r.errors
            # unknown session at start_pos > 0 (after the bounded wait) and a mismatch
            t0 = time.perf_counter()
            r = await w.attend(request(2, FIRST, [item("zz", 5, q, k, v), item("a", 1, q, k, v)]))
            assert time.perf_counter() - t0 >= 0.3 and list(r.out) == [b"", b""]
            assert [(e.session_id, e.code) for e in r.errors] == [
                ("zz", "NOT_FOUND"),
                ("a", "FAILED_PRECONDITION"),
            ]
            assert r.errors[1].have == 2
            # start_pos beyond what is held: waits, then FAILED_PRECONDITION with have
            r = await w.attend(request(3, FIRST + 1, [item("a", 4, q, k, v)]))
            assert [(e.code, e.have) for e in r.errors] == [("FAILED_PRECONDITION", 0)]
            # the phased path reports the Q-time error in the KV reply
            r = await w.attend(
                request(4, FIRST, [item("a", 7, q=q)], attn_pb2.PHASE_Q),
                request(4, FIRST, [item("a", 7, k=k, v=v)], attn_pb2.PHASE_KV),
            )
            assert [(e.code, e.have) for e in r.errors] == [("FAILED_PRECONDITION", 2)]
            # release, then NOT_FOUND
            assert (await w.stub.Release(attn_pb2.ReleaseRequest(session_id="a"))).released
            r = await w.attend(request(5, FIRST, [item("a", 2, q, k, v)]))
            assert [e.code for e in r.errors] == ["NOT_FOUND"]
            # capacity: 64-row buffers, room for two (session, layer) buffers
            for i, sid in enumerate(["x", "y", "z"]):
                r = await w.attend(request(10 + i, FIRST, [item(sid, 0, q, k, v)]))
                assert not r.errors
            st = await w.stub.Stats(attn_pb2.StatsRequest())
            assert (st.sessions, st.evictions, st.kv_bytes) == (2, 1, 2 * 64 * row)
            assert st.capacity_bytes == 2 * 64 * row
            big_q, big_k, big_v = a.rows(129)
            r = await w.attend(request(20, FIRST, [item("big", 0, big_q, big_k, big_v)]))
            assert [e.code for e in r.errors] == ["RESOURCE_EXHAUSTED"]
            # LoadKV position mismatch: FAILED_PRECONDITION with the position in metadata
            call = w.stub.LoadKV(iter([load_msg("z", FIRST, 3, k, v)]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert dict(await call.trailing_metadata())[HAVE_KEY] == "2"
            # a wrong head range ends the call
            await w.stream.write(request(30, FIRST, [item("z", 2, q, k, v)], kv=(0, 1)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await w.stream.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_bearer_token_guards_all_but_stats():
    async def main():
        running = await start_attention_worker(servicer(), token="sesame")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                stub = attn_pb2_grpc.AttentionWorkerStub(ch)
                assert (await stub.Stats(attn_pb2.StatsRequest())).kv_head_end == KVH
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Release(attn_pb2.ReleaseRequest(session_id="a"))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                reply = await stub.Release(
                    attn_pb2.ReleaseRequest(session_id="a"), metadata=bearer_metadata("sesame")
                )
                assert not reply.released
        finally:
            await running.stop(0)

    asyncio.run(main())


def test_pool_launcher_starts_partitioned_workers_and_stops_cleanly(tmp_path):
    """(f) `--workers 2` as a real process tree: two head ranges, SIGTERM leaves nothing."""
    args = [
        *("--n-heads", "4", "--n-kv-heads", "2", "--head-dim", "16", "--n-layers", "4"),
        *("--workers", "2", "--port", "0", "--metrics-port", "0", "--capacity-mb", "8"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(PYTHONUNBUFFERED="1", TANDEM_ATTN_THREADS="1")
    log = tmp_path / "pool.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.attention_pool.main", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while "--attention-pool" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        line = r"worker (\d): kv heads \[(\d), (\d)\)\s+gRPC ([\d.:]+)\s+metrics (\S+)\s+pid (\d+)"
        workers = re.findall(line, text)
        assert [w[:3] for w in workers] == [("0", "0", "1"), ("1", "1", "2")], text
        pids = [int(w[5]) for w in workers]
        ids = set()
        for index, start, end, address, metrics, _pid in workers:
            with grpc.insecure_channel(address) as ch:
                st = attn_pb2_grpc.AttentionWorkerStub(ch).Stats(attn_pb2.StatsRequest(), timeout=5)
            assert (st.kv_head_start, st.kv_head_end) == (int(start), int(end))
            assert (st.first_layer, st.n_layers, st.capacity_bytes) == (2, 2, 8 << 20)
            ids.add(st.worker_id)
            health = httpx.get(metrics.replace("/metrics", "/health"), timeout=5).json()
            assert health["status"] == "ok" and health["index"] == int(index)
        assert len(ids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        for pid in pids:  # the workers are gone too
            deadline = time.monotonic() + 5
            while _alive(pid):
                assert time.monotonic() < deadline, f"worker {pid} outlived the pool"
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive (our grandchild: reaped by init, or by the dead parent)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
