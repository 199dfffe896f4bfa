"""In-memory cloud sessions with an explicit memory cap, idle TTL and LRU eviction.

A session holds, for the cloud's layers [split, L): the KV cache of computed positions and
the uploaded split-layer hidden states not yet run (pending). An evicted or unknown
session raises `UnknownSession`; with a durable `SessionLog` the manager rebuilds it from
Redis, without one the edge recovers by uploading its context again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tandem.runtime.kv_cache import SequenceKV
from tandem.runtime.sampling import Sampler
from tandem.runtime.speculative import Draft


class UnknownSession(KeyError):
    """The session does not exist (never created, released or evicted): re-upload."""


class SessionTooLarge(RuntimeError):
    """One session alone would exceed the store's memory cap."""


@dataclass(frozen=True)
class LastToken:
    """The newest token answered for a session, kept so a retried request (its reply was
    lost) gets the same answer instead of a second sample."""

    position: int
    token: int
    prob: float


@dataclass
class CloudSession:
    session_id: str
    kv: SequenceKV
    pending: list[torch.Tensor] = field(default_factory=list)  # rows after `computed`
    computed: int = 0  # positions whose KV is filled
    uploaded: int = 0  # positions received (computed + pending rows)
    last_used: float = 0.0
    sampler: Sampler | None = None
    last: LastToken | None = None
    # Speculative sessions (`--collab speculative`): the edge's drafts not yet checked,
    # by the position they follow; the epoch counts rollbacks; `rollback` is the newest
    # (the token that replaced a rejected draft), repeated to messages of older epochs.
    speculative: bool = False
    drafts: dict[int, Draft] = field(default_factory=dict)
    epoch: int = 0
    rollback: LastToken | None = None

    def truncate(self, n: int, drop_kv: Callable[[CloudSession, int], None]) -> None:
        """Keep positions [0, n): computed KV beyond is dropped by `drop_kv(self, n)` (the
        runner's `truncate`: here or in the attention pool), as are pending rows and the
        drafts of the dropped positions. The positions are cut even if `drop_kv` raises."""
        cut = n < self.computed
        if cut:
            self.computed = n
        keep = n - self.computed
        rows = torch.cat(self.pending)[:keep] if self.pending and keep > 0 else None
        self.pending = [rows] if rows is not None and rows.shape[0] else []
        self.uploaded = min(self.uploaded, n)
        self.drafts = {p: d for p, d in self.drafts.items() if p < n - 1}
        if cut:
            drop_kv(self, n)

    def pending_rows(self) -> int:
        return self.uploaded - self.computed

    def nbytes(self) -> int:
        return self.kv.nbytes() + sum(t.numel() * t.element_size() for t in self.pending)


@dataclass(frozen=True)
class StoreLimits:
    max_bytes: int = 2 << 30
    ttl_s: float = 600.0
    max_sessions: int = 256


class SessionStore:
    def __init__(
        self,
        new_kv: Callable[[], SequenceKV],
        limits: StoreLimits,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        """`on_drop(session_id)` runs for every session that leaves the store (release or
        eviction), e.g. to free its KV in an attention pool."""
        self._new_kv = new_kv
        self._on_drop = on_drop
        self.limits = limits
        self._clock = clock
        self._sessions: OrderedDict[str, CloudSession] = OrderedDict()  # LRU first
        # stale: dropped because the durable log says another replica owns it now
        self.evictions: dict[str, int] = {"ttl": 0, "lru": 0, "release": 0, "stale": 0}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def nbytes(self) -> int:
        # a copy first: a metrics scrape reads this from another thread
        return sum(s.nbytes() for s in list(self._sessions.values()))

    def get(self, session_id: str) -> CloudSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(session_id)
        self._touch(session)
        return session

    def get_or_create(self, session_id: str) -> CloudSession:
        if session_id in self._sessions:
            return self.get(session_id)
        self.evict_idle()
        while len(self._sessions) >= self.limits.max_sessions:
            self._evict_lru("lru")
        session = CloudSession(session_id, self._new_kv())
        self._sessions[session_id] = session
        self._touch(session)
        return session

    def release(self, session_id: str, reason: str = "release") -> bool:
        if self._sessions.pop(session_id, None) is None:
            return False
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._dropped(session_id)
        return True

    def evict_idle(self) -> list[str]:
        deadline = self._clock() - self.limits.ttl_s
        gone = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for sid in gone:
            del self._sessions[sid]
            self.evictions["ttl"] += 1
            self._dropped(sid)
        return gone

    def enforce_cap(self, keep: str) -> list[str]:
        """Evict least-recently-used sessions other than `keep` until under the cap."""
        gone = []
        while self.nbytes() > self.limits.max_bytes:
            victim = next((sid for sid in self._sessions if sid != keep), None)
            if victim is None:
                raise SessionTooLarge(
                    f"session {keep!r} needs {self.nbytes()} bytes; the cap is "
                    f"{self.limits.max_bytes}"
                )
            del self._sessions[victim]
            self.evictions["lru"] += 1
            self._dropped(victim)
            gone.append(victim)
        return gone

    def _evict_lru(self, reason: str) -> None:
        sid, _ = self._sessions.popitem(last=False)
        self.evictions[reason] += 1
        self._dropped(sid)

    def _dropped(self, session_id: str) -> None:
        if self._on_drop is not None:
            self._on_drop(session_id)

    def _touch(self, session: CloudSession) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.session_id)
