"""Decode attention on Tandem's CPU kernel (attention.cpp, built with the int4/int8 kernels,
see tandem.runtime.kernels.extension).

`torch.ops.tandem_kernels.decode_attention(q, k, v, slot, pos, scale, window=-1)`: rows
q [T, H, hd], row t at position pos[t] of cache slot[t], over k, v [S, KVH, L, hd] (a slot
pool, or one sequence's cache as S = 1); each row sees its slot's positions <= pos[t] (and
> pos[t] - window). fp32 inside, one rounding to q's dtype. Both decode paths call it (the
compiled step and the eager reference, for the few rows of a decode step or a short prompt),
so they compute the same bits.
"""

from __future__ import annotations

import torch

from tandem.runtime.kernels.extension import available

__all__ = ["available", "decode_attention"]


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """The op (module docstring); `window` None for full causal attention."""
    return torch.ops.tandem_kernels.decode_attention(
        q, k, v, slot, pos, scale, -1 if window is None else window
    )
