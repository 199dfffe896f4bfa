"""Static KV slots: one preallocated cache per layer for up to `slots` sequences.

Each layer holds K and V as [slots, n_kv_heads, capacity, head_dim]. A sequence owns one
slot (`SlotKV`, the `SequenceKV` interface over its slice), so the compiled decode step
(tandem.runtime.compiled) can write new keys and read whole caches by (slot, position)
inside one graph, with no per-sequence Python. The tensors come from `torch.empty`: the
operating system commits their pages as they are first written, so memory grows with the
positions actually used, not with `capacity`.

A slot is freed when its `SlotKV` is released or garbage-collected. When all slots are
taken, `SlotPool.acquire` returns None and the caller falls back to a `SequenceKV`
(the eager path serves it).
"""

from __future__ import annotations

import weakref

import torch


class SlotPool:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        slots: int,
        capacity: int,
        device: torch.device | None = None,
    ) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"slots ({slots}) and capacity ({capacity}) must be positive")
        shape = (slots, n_kv_heads, capacity, head_dim)
        # On a GPU, zeros: positions a row does not see are then always finite, so the
        # CUDA path's attention may weight them by 0 (on the CPU, pages stay uncommitted).
        on_gpu = device is not None and torch.device(device).type == "cuda"
        new = torch.zeros if on_gpu else torch.empty
        self.k = [new(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [new(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, first_layer: int, last_layer: int) -> SlotKV | None:
        """A slot for layers [first_layer, last_layer), or None when all are taken."""
        if not self._free:
            return None
        return SlotKV(self, self._free.pop(), first_layer, last_layer - first_layer)

    def _release(self, slot: int) -> None:
        self._free.append(slot)


class SlotKV:
    """One sequence's KV in a `SlotPool` slot; the same interface as `SequenceKV`."""

    def __init__(self, pool: SlotPool, slot: int, first_layer: int, n_layers: int) -> None:
        self.pool = pool
        self.slot = slot
        self.first_layer = first_layer
        self.lengths = [0] * n_layers
        self._finalizer = weakref.finalize(self, pool._release, slot)

    def release(self) -> None:
        """Give the slot back now (also happens when this object is collected)."""
        self._finalizer()

    def length(self, layer: int) -> int:
        return self.lengths[layer - self.first_layer]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape [n_kv_heads, n, head_dim]; return views of the full cache."""
        i = layer - self.first_layer
        start, n = self.lengths[i], k.shape[1]
        if start + n > self.pool.capacity:
            raise ValueError(
                f"layer {layer}: {start + n} positions exceed the slot capacity "
                f"{self.pool.capacity}"
            )
        kp, vp = self.pool.k[layer][self.slot], self.pool.v[layer][self.slot]
        kp[:, start : start + n] = k
        vp[:, start : start + n] = v
        self.lengths[i] = start + n
        return kp[:, : start + n], vp[:, : start + n]

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of one layer's K and V, [n_kv_heads, length, head_dim]."""
        n = self.lengths[layer - self.first_layer]
        return self.pool.k[layer][self.slot, :, :n], self.pool.v[layer][self.slot, :, :n]

    def truncate(self, n: int) -> None:
        """Forget every position from n on (a rollback): attention masks by length."""
        self.lengths = [min(length, n) for length in self.lengths]

    def nbytes(self) -> int:
        """Bytes of the positions written (what the slot's pages hold)."""
        k = self.pool.k[self.first_layer]
        per_pos = k.shape[1] * k.shape[3] * k.element_size() * 2
        return per_pos * sum(self.lengths)
