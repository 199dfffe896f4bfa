"""SessionStore: TTL, LRU by count, release, unknown sessions, the too-large case."""

from __future__ import annotations

import pytest
import torch

from services.cloud_ctx.session_store import (
    SessionStore,
    SessionTooLarge,
    StoreLimits,
    UnknownSession,
)
from tandem.runtime.kv_cache import SequenceKV


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _store(clock, **limits) -> SessionStore:
    return SessionStore(lambda: SequenceKV(2, 1, 4, torch.float32), StoreLimits(**limits), clock)


def test_idle_sessions_expire_after_ttl():
    clock = FakeClock()
    store = _store(clock, ttl_s=10)
    store.get_or_create("old")
    clock.now = 8
    store.get_or_create("fresh")
    clock.now = 15
    assert store.evict_idle() == ["old"]
    assert store.get("fresh").session_id == "fresh"
    assert store.evictions["ttl"] == 1


def test_session_count_limit_evicts_least_recently_used():
    clock = FakeClock()
    store = _store(clock, max_sessions=2)
    store.get_or_create("a")
    store.get_or_create("b")
    store.get("a")  # a is now the most recently used
    store.get_or_create("c")
    with pytest.raises(UnknownSession):
        store.get("b")
    assert {store.get("a").session_id, store.get("c").session_id} == {"a", "c"}


def test_release_and_a_session_over_the_cap():
    store = _store(FakeClock(), max_bytes=10)
    s = store.get_or_create("big")
    assert s.nbytes() > 10
    with pytest.raises(SessionTooLarge):
        store.enforce_cap(keep="big")
    assert store.release("big") and not store.release("big")
    assert store.evictions["release"] == 1
