"""Truncating a session's KV (a speculative rollback): the store keeps the first n positions
at every layer (lengths only); over real gRPC the PoolClient truncates it on every worker,
after its queued loads, and the next decode attends exactly over what was kept. Anything
but a requested truncation is refused: a stale position, too few positions, an unknown
session or one a worker lost all come back as PoolKVLost."""

from __future__ import annotations

import pytest
import torch

from services.attention_pool.kv_store import KVStore, PositionMismatch, UnknownSession
from tandem.clients.pool import KVLoad, PoolClient, PoolKVLost, PoolShape
from tandem.runtime.model import attention
from tests.services.attention_pool.inproc_pool import PoolSpec, inproc_pool

BF16 = torch.bfloat16


def _rows(n: int, heads: int, hd: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, hd, generator=g).to(BF16)


def test_store_truncate_keeps_the_first_n_positions_at_every_layer():
    kvh, hd = 2, 4
    s = KVStore(10, 2, 0, kvh, hd, BF16, 1 << 20, initial_rows=4)
    k, v = _rows(6, kvh, hd, 0), _rows(6, kvh, hd, 1)
    for layer in (10, 11):
        s.append("a", layer, 0, k, v)
    held = s.nbytes
    s.truncate("a", 4)
    assert [s.length("a", layer) for layer in (10, 11)] == [4, 4]
    assert s.nbytes == held  # buffers stay: the next appends reuse them
    kv, vv = s.view("a", 10)
    assert torch.equal(kv, k[:4].transpose(0, 1)) and torch.equal(vv, v[:4].transpose(0, 1))
    with pytest.raises(PositionMismatch):  # the old end is gone: no silent append there
        s.append("a", 10, 6, k[:1], v[:1])
    k2, v2 = _rows(1, kvh, hd, 2), _rows(1, kvh, hd, 3)
    assert s.append("a", 10, 4, k2, v2) == 5
    assert torch.equal(s.view("a", 10)[0][:, 4], k2[0])

    # A layer holding fewer than n: refused, nothing changed.
    with pytest.raises(PositionMismatch) as err:
        s.truncate("a", 5)
    assert err.value.layer == 11 and err.value.have == 4
    assert [s.length("a", layer) for layer in (10, 11)] == [5, 4]
    s.truncate("a", 4)  # to what every layer holds: fine
    s.truncate("a", 0)
    assert [s.length("a", layer) for layer in (10, 11)] == [0, 0] and "a" in s
    with pytest.raises(UnknownSession):
        s.truncate("b", 1)
    with pytest.raises(ValueError):
        s.truncate("a", -1)


def test_pool_client_truncates_on_every_worker_and_decode_goes_on_exactly():
    H, KVH, HD, FIRST, LAYERS = 4, 2, 16, 2, 2
    scale = HD**-0.5
    spec = PoolSpec(H, KVH, HD, scale, FIRST, LAYERS, load_wait_s=0.5)
    layers = range(FIRST, FIRST + LAYERS)
    with inproc_pool(spec) as pool:
        client = PoolClient(pool.addresses, PoolShape(H, KVH, HD, BF16), connect_timeout_s=10)
        try:
            # Prefill 6 positions (loaded on the loader thread), then roll back to 3 at once:
            # the truncate must wait for the queued loads, not race them.
            k = {la: _rows(6, KVH, HD, la) for la in layers}
            v = {la: _rows(6, KVH, HD, 10 + la) for la in layers}
            client.load_kv([KVLoad("s", la, 0, k[la], v[la]) for la in layers])
            client.truncate("s", 3)
            for svc in pool.servicers:
                assert [svc.store.length("s", la) for la in layers] == [3, 3]

            # Decode on: position 3 attends over the 3 kept positions and itself.
            for step, pos in enumerate((3, 4)):
                for la in layers:
                    q = _rows(1, H, HD, 100 + 10 * step + la)
                    kn, vn = _rows(1, KVH, HD, 200 + 10 * step + la), _rows(1, KVH, HD, 300 + la)
                    out = client.attend_rows(la, ["s"], [pos], [1], q, kn, vn)
                    k[la] = torch.cat([k[la][:pos], kn])
                    v[la] = torch.cat([v[la][:pos], vn])
                    want = attention(q, k[la].transpose(0, 1), v[la].transpose(0, 1), scale, None)
                    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)

            # Truncation keeps the workers' buffers.
            before = [st.kv_bytes for st in client.stats()]
            client.truncate("s", 2)
            assert [st.kv_bytes for st in client.stats()] == before

            # Never a silent mismatch: the old end, too many positions, unknown sessions.
            q, kn, vn = _rows(1, H, HD, 7), _rows(1, KVH, HD, 8), _rows(1, KVH, HD, 9)
            with pytest.raises(PoolKVLost) as lost:
                client.attend_rows(FIRST, ["s"], [5], [1], q, kn, vn)
            assert lost.value.sessions == {"s"}
            with pytest.raises(PoolKVLost):
                client.truncate("s", 3)  # holds 2 (at FIRST) now
            with pytest.raises(PoolKVLost):
                client.truncate("nobody", 1)

            # One worker lost the session (restart, eviction): the pool lost its KV.
            pool.servicers[1].store.release("s")
            with pytest.raises(PoolKVLost) as lost:
                client.truncate("s", 1)
            assert lost.value.sessions == {"s"}
        finally:
            client.close()
