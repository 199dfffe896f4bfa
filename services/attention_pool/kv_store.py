"""The KV cache of one attention worker: per session, per layer K and V of its KV heads.

Layers [first_layer, first_layer + n_layers), KV heads [kv_head_start, kv_head_end). Each
(session, layer) buffer is [kv_heads, capacity, head_dim] and grows like
`tandem.runtime.kv_cache.SequenceKV` (doubling), allocated on the layer's first append, so
layers fill independently (prefill KV arrives layer by layer).

Memory accounting is exact: `nbytes` is the bytes of the buffers allocated now, and an append
that needs more memory than `capacity_bytes` leaves first evicts the least recently used
*other* sessions (counted in `evictions`), then, if doubling still does not fit, grows to the
exact size, and only then raises `KVCapacityExceeded` (at once, evicting nobody, when the
session would not fit even alone). One lock guards the tables, so the
event loop may read lengths and stats while the compute thread appends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


class KVStoreError(Exception):
    """Base of the store's typed errors (each maps to one gRPC status code)."""


class UnknownSession(KVStoreError):
    """NOT_FOUND: no KV for the session (never loaded, released, evicted, restarted)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no KV for session {session_id!r}")
        self.session_id = session_id


class PositionMismatch(KVStoreError):
    """FAILED_PRECONDITION: the layer's KV ends at `have`, not at `start_pos`."""

    def __init__(self, session_id: str, layer: int, start_pos: int, have: int) -> None:
        super().__init__(
            f"session {session_id!r} layer {layer}: KV ends at {have}, not at {start_pos}"
        )
        self.session_id, self.layer, self.start_pos, self.have = session_id, layer, start_pos, have


class KVCapacityExceeded(KVStoreError):
    """RESOURCE_EXHAUSTED: the append does not fit even after evicting every other session."""

    def __init__(self, session_id: str, need: int, held: int, capacity: int) -> None:
        super().__init__(
            f"session {session_id!r}: {need} more bytes do not fit "
            f"({held} held of {capacity}, other sessions evicted)"
        )
        self.session_id, self.need, self.held, self.capacity = session_id, need, held, capacity


@dataclass(frozen=True)
class KVStoreStats:
    kv_bytes: int
    capacity_bytes: int
    sessions: int
    evictions: int


class _Session:
    __slots__ = ("k", "v", "lengths", "nbytes")

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers
        self.nbytes = 0


class KVStore:
    def __init__(
        self,
        first_layer: int,
        n_layers: int,
        kv_head_start: int,
        kv_head_end: int,
        head_dim: int,
        dtype: torch.dtype,
        capacity_bytes: int,
        initial_rows: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        if n_layers < 1 or not 0 <= kv_head_start < kv_head_end or head_dim < 1:
            raise ValueError("need n_layers >= 1, a non-empty head range and head_dim >= 1")
        if capacity_bytes < 0 or initial_rows < 1:
            raise ValueError("capacity_bytes must be >= 0 and initial_rows >= 1")
        self.first_layer = first_layer
        self.n_layers = n_layers
        self.kv_head_start = kv_head_start
        self.kv_head_end = kv_head_end
        self.kv_heads = kv_head_end - kv_head_start
        self.head_dim = head_dim
        self.dtype = dtype
        self.capacity_bytes = capacity_bytes
        self.initial_rows = initial_rows
        self.device = torch.device(device)  # where the K/V buffers live (the pool's --device)
        self.evictions = 0
        self._row_bytes = 2 * self.kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU first
        self._nbytes = 0
        self._lock = threading.Lock()

    # -- reads ---------------------------------------------------------------------------

    def _index(self, layer: int) -> int:
        i = layer - self.first_layer
        if not 0 <= i < self.n_layers:
            last = self.first_layer + self.n_layers
            raise ValueError(f"layer {layer} is outside this worker's [{self.first_layer}, {last})")
        return i

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V buffers allocated now (including grown, unfilled rows)."""
        return self._nbytes

    def length(self, session_id: str, layer: int) -> int:
        """Positions held at `layer`; UnknownSession if the session is not here."""
        i = self._index(layer)
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(session_id)
            return s.lengths[i]

    def view(self, session_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of K and V at `layer`, [kv_heads, length, head_dim] each (views:
        valid until the next append to this layer, which may replace the buffers)."""
        i = self._index(layer)
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(session_id)
            self._sessions.move_to_end(session_id)
            n, k, v = s.lengths[i], s.k[i], s.v[i]
        if k is None or v is None:
            empty = torch.empty(
                self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device
            )
            return empty, empty
        return k[:, :n], v[:, :n]

    def stats(self) -> KVStoreStats:
        with self._lock:
            return KVStoreStats(
                self._nbytes, self.capacity_bytes, len(self._sessions), self.evictions
            )

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    # -- writes --------------------------------------------------------------------------

    def append(
        self, session_id: str, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> int:
        """Append k, v [n, kv_heads, head_dim] at `start_pos` of `layer`; return the new
        length. The session is created only by an append at start_pos 0."""
        return self._append(session_id, layer, start_pos, k, v)[0]

    def append_view(
        self, session_id: str, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`append`, then the layer's filled K and V (`view`), under one lock."""
        end, kb, vb = self._append(session_id, layer, start_pos, k, v)
        return kb[:, :end], vb[:, :end]

    def _append(
        self, session_id: str, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        i = self._index(layer)
        want = (self.kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            raise ValueError(f"k and v must be [n, {want[0]}, {want[1]}], got {k.shape}, {v.shape}")
        n = k.shape[0]
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                if start_pos != 0:
                    raise UnknownSession(session_id)
                s = _Session(self.n_layers)
                self._sessions[session_id] = s
            self._sessions.move_to_end(session_id)
            have = s.lengths[i]
            if have != start_pos:
                raise PositionMismatch(session_id, layer, start_pos, have)
            end = start_pos + n
            buf = s.k[i]
            cap = 0 if buf is None else buf.shape[1]
            if end > cap:
                self._grow(session_id, s, i, cap, end)
            kb, vb = s.k[i], s.v[i]
            assert kb is not None and vb is not None
            kb[:, start_pos:end] = k.transpose(0, 1)
            vb[:, start_pos:end] = v.transpose(0, 1)
            s.lengths[i] = end
            return end, kb, vb

    def _grow(self, session_id: str, s: _Session, i: int, cap: int, end: int) -> None:
        new_cap = max(cap * 2, end, self.initial_rows)
        need = (new_cap - cap) * self._row_bytes
        least = (end - cap) * self._row_bytes
        if s.nbytes + least > self.capacity_bytes:  # would not fit alone: evict nobody
            self._fail(session_id, s, least)
        if self._nbytes + need > self.capacity_bytes:
            self._evict_for(session_id, need)
        if self._nbytes + need > self.capacity_bytes:  # doubling does not fit: exact size
            new_cap = end
            need = (new_cap - cap) * self._row_bytes
        if self._nbytes + need > self.capacity_bytes:
            self._fail(session_id, s, need)
        shape = (self.kv_heads, new_cap, self.head_dim)
        for bufs in (s.k, s.v):
            grown = torch.empty(shape, dtype=self.dtype, device=self.device)
            old = bufs[i]
            if old is not None:
                grown[:, : s.lengths[i]] = old[:, : s.lengths[i]]
            bufs[i] = grown
        s.nbytes += need
        self._nbytes += need

    def _fail(self, session_id: str, s: _Session, need: int) -> None:
        if s.nbytes == 0:  # created by this append: do not keep an empty session
            del self._sessions[session_id]
        raise KVCapacityExceeded(session_id, need, self._nbytes, self.capacity_bytes)

    def _evict_for(self, keep: str, need: int) -> None:
        """Drop least recently used sessions other than `keep` until `need` more bytes fit."""
        for victim in list(self._sessions):
            if self._nbytes + need <= self.capacity_bytes:
                return
            if victim == keep:
                continue
            self._nbytes -= self._sessions.pop(victim).nbytes
            self.evictions += 1

    def truncate(self, session_id: str, n: int) -> None:
        """Keep positions [0, n) at every layer (a speculative rollback): lengths only, the
        buffers (and `nbytes`) stay. UnknownSession if the session is not here;
        PositionMismatch (nothing changed) if a layer holds fewer than n positions."""
        if n < 0:
            raise ValueError(f"cannot truncate to {n} positions")
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(session_id)
            for i, have in enumerate(s.lengths):
                if have < n:
                    raise PositionMismatch(session_id, self.first_layer + i, n, have)
            s.lengths = [n] * self.n_layers
            self._sessions.move_to_end(session_id)

    def release(self, session_id: str) -> bool:
        """Free the session's KV; False if it was not here."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return False
            self._nbytes -= s.nbytes
            return True
