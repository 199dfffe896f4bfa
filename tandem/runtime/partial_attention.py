"""Attention as mergeable parts (Lamina's overlap, and the attention pool's math).

`partial_attention` returns the attention output over a set I of keys together with the
log of its softmax normaliser, `lse = log S_q(I) = log sum_{i in I} exp(q.k_i * scale)`.
Two parts over disjoint key sets merge exactly (`merge`):

    A_q(I1 u I2) = (A_q(I1) S_q(I1) + A_q(I2) S_q(I2)) / (S_q(I1) + S_q(I2))

computed in log space (no overflow). An empty key set has lse = -inf and contributes nothing.
Query heads map onto key/value heads in GQA groups (head h uses kv head h // (H / KVH)).
Math runs in float32; callers cast the result.

`decode_attention` is the decode kernel (one new row per sequence, over per-sequence caches):
the attention pool's workers and the local decode path run this same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, H, hd] over keys k, v [KVH, L, hd]. With `causal`, the keys are the queries' own
    rows (L == n) and row i sees keys 0..i; otherwise every row sees every key.
    Returns (out [n, H, hd] float32, lse [n, H] float32)."""
    n, heads, hd = q.shape
    kv_heads, length = k.shape[0], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    if causal and length != n:
        raise ValueError(f"causal part needs as many keys as queries ({length} != {n})")
    if length == 0:
        empty = torch.full((n, heads), float("-inf"), device=q.device)
        return q.new_zeros(n, heads, hd, dtype=torch.float32), empty
    group = heads // kv_heads
    # Grouped: each kv head's G query heads become G*n rows against that head's keys, so K
    # and V are read once per kv head instead of being copied G times.
    qf = q.float().reshape(n, kv_heads, group, hd).permute(1, 2, 0, 3).reshape(kv_heads, -1, hd)
    scores = torch.matmul(qf, k.float().transpose(1, 2)) * scale  # [KVH, G*n, L]
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1).repeat(group, 1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [KVH, G*n]
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())  # [KVH, G*n, hd]
    out = out.reshape(kv_heads, group, n, hd).permute(2, 0, 1, 3).reshape(n, heads, hd)
    lse = lse.reshape(kv_heads, group, n).permute(2, 0, 1).reshape(n, heads)
    return out, lse


def merge(
    a1: torch.Tensor, lse1: torch.Tensor, a2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two parts (out [n, H, hd], lse [n, H]) over disjoint key sets."""
    top = torch.maximum(lse1, lse2)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # both empty: stay zero
    w1 = torch.exp(lse1 - top)
    w2 = torch.exp(lse2 - top)
    total = w1 + w2
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (a1 * w1[..., None] + a2 * w2[..., None]) / safe[..., None]
    return out, top + torch.log(safe)


def attend_with_cache(
    q: torch.Tensor,
    k_prev: torch.Tensor,
    v_prev: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of n new rows over a cache of previous keys plus their own: the
    previous part and the new part computed separately and merged. q [n, H, hd], k_prev /
    v_prev [KVH, L, hd], k_new / v_new [KVH, n, hd]. Returns [n, H, hd] float32."""
    a1, l1 = partial_attention(q, k_prev, v_prev, scale, causal=False)
    a2, l2 = partial_attention(q, k_new, v_new, scale, causal=True)
    return merge(a1, l1, a2, l2)[0]


def decode_attention(
    q: torch.Tensor,
    caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of B sequences, one new row each: q [B, H, hd]; caches[i] = (k, v),
    each [KVH, L_i, hd] (any dtype; views are fine), sequence i's whole cache *including*
    its new row's own key and value (append first). Every row sees every key of its cache.

    Grouped GQA: the G = H / KVH query heads of a KV head are G rows of one matmul against
    that head's keys, so K and V are read once per KV head (never repeated G times). Scores,
    softmax and the weighted sum run in float32. Returns [B, H, hd] float32 (written into
    `out` when given: a float32 [B, H, hd] tensor, e.g. a reused buffer)."""
    batch, heads, hd = q.shape
    if len(caches) != batch:
        raise ValueError(f"{batch} query rows but {len(caches)} caches")
    if out is None:
        out = torch.empty(batch, heads, hd, dtype=torch.float32, device=q.device)
    elif out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor shaped like q")
    if batch == 0:
        return out
    kv_heads = caches[0][0].shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    group = heads // kv_heads
    qs = (q.float() * scale).view(batch, kv_heads, group, hd)
    grouped = out.view(batch, kv_heads, group, hd)
    for i, (k, v) in enumerate(caches):
        if k.shape[0] != kv_heads or k.shape[1] == 0 or k.shape != v.shape:
            raise ValueError(f"cache {i}: k {tuple(k.shape)}, v {tuple(v.shape)}")
        scores = torch.matmul(qs[i], k.float().transpose(1, 2))  # [KVH, G, L]
        torch.matmul(torch.softmax(scores, dim=-1), v.float(), out=grouped[i])
    return out
