"""The attention worker's KV store: positions, sessions, exact bytes, capacity and LRU."""

from __future__ import annotations

import pytest
import torch

from services.attention_pool.kv_store import (
    KVCapacityExceeded,
    KVStore,
    PositionMismatch,
    UnknownSession,
)

KVH, HD = 2, 4
ROW = 2 * KVH * HD * 2  # bytes of one position's K and V in bf16


def rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, KVH, HD, generator=g).to(torch.bfloat16)
    return k, (k * 2)


def store(capacity_rows: int = 1000, initial_rows: int = 4) -> KVStore:
    return KVStore(10, 2, 2, 4, HD, torch.bfloat16, capacity_rows * ROW, initial_rows)


def test_append_and_view_grow_by_layer():
    s = store()
    k, v = rows(3)
    assert s.append("a", 10, 0, k, v) == 3
    assert s.length("a", 10) == 3 and s.length("a", 11) == 0  # layers fill independently
    k2, v2 = rows(5, seed=1)
    assert s.append("a", 10, 3, k2, v2) == 8  # grows past the initial 4 rows
    kv, vv = s.view("a", 10)
    assert kv.shape == (KVH, 8, HD)
    assert torch.equal(kv, torch.cat([k, k2]).transpose(0, 1))
    assert torch.equal(vv, torch.cat([v, v2]).transpose(0, 1))
    ke, _ = s.view("a", 11)
    assert ke.shape == (KVH, 0, HD)
    assert s.sessions() == ["a"] and "a" in s and len(s) == 1


def test_position_rules():
    s = store()
    k, v = rows(2)
    with pytest.raises(UnknownSession):
        s.append("a", 10, 5, k, v)  # only start_pos 0 creates a session
    assert "a" not in s
    s.append("a", 10, 0, k, v)
    with pytest.raises(PositionMismatch) as err:
        s.append("a", 10, 1, k, v)
    assert err.value.have == 2 and err.value.start_pos == 1
    with pytest.raises(PositionMismatch) as err:
        s.append("a", 11, 2, k, v)  # layer 11 holds nothing yet
    assert err.value.have == 0
    with pytest.raises(UnknownSession):
        s.length("b", 10)
    with pytest.raises(ValueError):
        s.append("a", 12, 2, k, v)  # outside [10, 12)
    with pytest.raises(ValueError):
        s.append("a", 10, 2, k[:, :1], v[:, :1])  # wrong head count


def test_exact_accounting_and_release():
    s = store(initial_rows=4)
    assert s.nbytes == 0
    s.append("a", 10, 0, *rows(1))
    assert s.nbytes == 4 * ROW  # initial buffer, K and V
    s.append("a", 10, 1, *rows(4))
    assert s.nbytes == 8 * ROW  # doubled
    s.append("a", 11, 0, *rows(9))
    assert s.nbytes == 8 * ROW + 9 * ROW  # max(2 * 0, 9, 4)
    s.append("b", 10, 0, *rows(1))
    assert s.stats().kv_bytes == 21 * ROW and s.stats().sessions == 2
    assert s.release("a") and not s.release("a")
    assert s.nbytes == 4 * ROW
    with pytest.raises(UnknownSession):
        s.view("a", 10)


def test_capacity_evicts_least_recently_used_others():
    s = store(capacity_rows=12, initial_rows=4)
    for sid in ("a", "b", "c"):
        s.append(sid, 10, 0, *rows(1))  # 4 rows each: 12 of 12
    s.view("a", 10)  # a is now more recent than b and c
    s.append("d", 10, 0, *rows(1))  # evicts b (the least recently used)
    assert s.sessions() == ["c", "a", "d"] and s.evictions == 1
    s.append("a", 10, 1, *rows(4))  # a grows 4 -> 8: evicts c
    assert "c" not in s and s.evictions == 2 and s.nbytes == 12 * ROW
    # doubling a to 16 does not fit even alone: it grows to the exact size after evicting d
    s.append("a", 10, 5, *rows(7))
    assert s.sessions() == ["a"] and s.evictions == 3 and s.nbytes == 12 * ROW
    with pytest.raises(KVCapacityExceeded):
        s.append("a", 10, 12, *rows(1))
    assert s.length("a", 10) == 12  # unchanged
    s.append("e", 10, 0, *rows(1))  # a new session evicts a
    assert s.sessions() == ["e"] and s.evictions == 4 and s.nbytes == 4 * ROW
    with pytest.raises(KVCapacityExceeded):
        s.append("f", 10, 0, *rows(13))  # larger than the whole capacity: evicts nobody
    assert s.sessions() == ["e"] and s.stats().evictions == 4 and s.nbytes == 4 * ROW
