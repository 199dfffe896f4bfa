"""Per-sequence KV cache for a range of layers.

Each layer keeps its own length: with deferred early exit, the layers a token skipped
are filled later, so lengths differ between layers for a while.
"""

from __future__ import annotations

import torch


class SequenceKV:
    """K and V for one sequence, layers [first_layer, first_layer + n_layers)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        first_layer: int = 0,
        initial_capacity: int = 64,
        device: torch.device | None = None,
    ) -> None:
        self.first_layer = first_layer
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.lengths = [0] * n_layers
        for _ in range(n_layers):
            shape = (n_kv_heads, initial_capacity, head_dim)
            self._k.append(torch.empty(shape, dtype=dtype, device=device))
            self._v.append(torch.empty(shape, dtype=dtype, device=device))

    def length(self, layer: int) -> int:
        return self.lengths[layer - self.first_layer]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape [n_kv_heads, n, head_dim]; return views of the full cache."""
        i = layer - self.first_layer
        n = k.shape[1]
        start = self.lengths[i]
        cap = self._k[i].shape[1]
        if start + n > cap:
            new_cap = max(cap * 2, start + n)
            for bufs in (self._k, self._v):
                old = bufs[i]
                shape = (old.shape[0], new_cap, old.shape[2])
                grown = torch.empty(shape, dtype=old.dtype, device=old.device)
                grown[:, :start] = old[:, :start]
                bufs[i] = grown
        self._k[i][:, start : start + n] = k
        self._v[i][:, start : start + n] = v
        self.lengths[i] = start + n
        return self._k[i][:, : start + n], self._v[i][:, : start + n]

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of one layer's K and V, [n_kv_heads, length, head_dim]."""
        i = layer - self.first_layer
        return self._k[i][:, : self.lengths[i]], self._v[i][:, : self.lengths[i]]

    def truncate(self, n: int) -> None:
        """Forget every position from n on (a rollback); what is kept stays as it was."""
        self.lengths = [min(length, n) for length in self.lengths]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)
