"""The attention pool's KV and kernels on CUDA (skipped without a GPU): a KVStore on the
GPU holds what a CPU one holds, and the pool's attention kernels give the CPU's answers."""

from __future__ import annotations

import pytest
import torch

from services.attention_pool.kv_store import KVStore
from tandem.runtime.partial_attention import attend_with_cache, decode_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _store(device: str) -> KVStore:
    return KVStore(2, 2, 0, 2, 16, torch.bfloat16, 2**24, device=device)


def test_kv_store_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 16, generator=g).bfloat16()
    v = torch.randn(5, 2, 16, generator=g).bfloat16()
    views = []
    for dev in ("cpu", "cuda"):
        store = _store(dev)
        store.append("s", 2, 0, k, v)
        kk, vv = store.view("s", 2)
        assert kk.device.type == dev
        views.append((kk.cpu(), vv.cpu()))
    assert torch.equal(views[0][0], views[1][0]) and torch.equal(views[0][1], views[1][1])


def test_pool_kernels_on_gpu_match_cpu():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 16, generator=g)
    caches = [
        (torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)) for n in (4, 9, 1)
    ]
    want = decode_attention(q, caches, 0.25)
    got = decode_attention(q.cuda(), [(k.cuda(), v.cuda()) for k, v in caches], 0.25)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    kp, vp = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    kn, vn = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    want = attend_with_cache(q, kp, vp, kn, vn, 0.25)
    got = attend_with_cache(*(t.cuda() for t in (q, kp, vp, kn, vn)), 0.25)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
