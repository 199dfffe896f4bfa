"""cloud_ctx's offload mode: its layers run here, every attention runs in the attention pool.

Per layer, for the batch's rows: the input norm and q/k/v projections (with RoPE) here; then
each sequence's attention:

- a sequence starting at position 0 (a new session's prefill, or a rebuild) attends locally
  over its own rows (nothing earlier exists) and its k, v go to the pool on the loader thread,
  layer by layer, without blocking anyone's decode;
- every other sequence's q, k_new, v_new go to the pool together (`PoolClient.attend_rows`:
  one packed message per worker per layer, all sequences' rows in one blob), which appends
  k, v to each session's KV and returns the attention output;

then the output projection, residuals and MLP here. Nothing of the KV stays on this side;
a speculative rollback truncates the session's KV in the pool (`truncate`).

Rotational staggered pipelining with n = 2 (`micro_batches=2`): the batch's sequences are
split into two micro-batches that run in two threads; while one waits for the pool's
attention of a layer, the other runs its dense part (torch and gRPC both release the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from services.cloud_ctx.session_store import CloudSession
from tandem.clients.pool import (
    KVLoad,
    PoolClient,
    PoolKVLost,
    PoolUnavailable,
)
from tandem.runtime.model import DecoderModel, attention


class OffloadRunner:
    def __init__(
        self,
        model: DecoderModel,
        start: int,
        pool: PoolClient,
        *,
        micro_batches: int = 1,
        pool_wait_s: float = 30.0,
    ) -> None:
        windows = [model.cfg.sliding_window[i] for i in range(start, model.cfg.n_layers)]
        if any(w is not None for w in windows):
            raise ValueError("offload mode supports full causal attention only (no sliding window)")
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.model = model
        self.start = start
        self.pool = pool
        self.micro_batches = micro_batches
        self.pool_wait_s = pool_wait_s
        self._threads = ThreadPoolExecutor(micro_batches, thread_name_prefix="offload")

    def run(self, batch: Sequence[tuple[CloudSession, torch.Tensor]]) -> list[torch.Tensor]:
        """Raises PoolKVLost (recompute those sessions) also after a worker failed and came
        back within `pool_wait_s`: whatever the batch appended before the failure is
        suspect. PoolUnavailable if the pool stays down."""
        items = [(s.session_id, s.computed, rows) for s, rows in batch]
        try:
            return self.run_rows(items)
        except PoolUnavailable as exc:
            self.pool.refresh(self.pool_wait_s)  # raises PoolUnavailable if still down
            raise PoolKVLost({sid for sid, _, _ in items}, f"a worker failed: {exc}") from exc

    def run_rows(self, items: Sequence[tuple[str, int, torch.Tensor]]) -> list[torch.Tensor]:
        """(session id, first position, rows [n, d]) per sequence -> output rows."""
        parts = split_micro_batches(items, self.micro_batches)
        if len(parts) == 1:
            return self._run(parts[0][1])
        futures = [self._threads.submit(self._run, part) for _, part in parts]
        outs: list[torch.Tensor | None] = [None] * len(items)
        for (index, _), fut in zip(parts, futures, strict=True):
            for i, out in zip(index, fut.result(), strict=True):
                outs[i] = out
        return outs  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, items: Sequence[tuple[str, int, torch.Tensor]]) -> list[torch.Tensor]:
        model = self.model
        h = torch.cat([rows for _, _, rows in items])
        positions = torch.cat([torch.arange(p, p + rows.shape[0]) for _, p, rows in items])
        rot = model.rope.at(positions, h.dtype)
        bounds, off = [], 0
        for _, _, rows in items:
            bounds.append(slice(off, off + rows.shape[0]))
            off += rows.shape[0]
        # What the pool gets is the same at every layer: work it out once per step.
        local = [i for i, (_, pos, _) in enumerate(items) if pos == 0]
        remote = [i for i, (_, pos, _) in enumerate(items) if pos != 0]
        sids = [items[i][0] for i in remote]
        starts = [items[i][1] for i in remote]
        counts = [bounds[i].stop - bounds[i].start for i in remote]
        every_row = not local  # the whole batch attends remotely: no gather / scatter
        idx = None
        if remote and not every_row:
            idx = torch.cat([torch.arange(bounds[i].start, bounds[i].stop) for i in remote])
        for layer in model.layers[self.start :]:
            q, k, v = layer.qkv(layer.input_layernorm(h), rot)
            if every_row:
                attn = self.pool.attend_rows(layer.index, sids, starts, counts, q, k, v)
            else:
                attn = torch.empty_like(q)
                loads = []
                for i in local:
                    rows = bounds[i]
                    kk, vv = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                    attn[rows] = attention(q[rows], kk, vv, model.cfg.attn_scale, None)
                    loads.append(KVLoad(items[i][0], layer.index, 0, k[rows], v[rows]))
                self.pool.load_kv(loads)
                if idx is not None:
                    attn[idx] = self.pool.attend_rows(
                        layer.index, sids, starts, counts, q[idx], k[idx], v[idx]
                    )
            h = layer.after_attention(h, attn)
        return [h[rows] for rows in bounds]

    def release(self, session_id: str) -> None:
        self.pool.release(session_id)

    def truncate(self, session: CloudSession, n: int) -> None:
        """Truncate the session's KV on every worker (PoolClient.truncate). PoolKVLost if
        the pool lost it, also when a worker failed and came back (as in `run`)."""
        try:
            self.pool.truncate(session.session_id, n)
        except PoolUnavailable as exc:
            self.pool.refresh(self.pool_wait_s)  # raises PoolUnavailable if still down
            raise PoolKVLost({session.session_id}, f"a worker failed: {exc}") from exc

    def close(self) -> None:
        self._threads.shutdown(wait=False)


def split_micro_batches(
    items: Sequence[tuple[str, int, torch.Tensor]], n: int
) -> list[tuple[list[int], list[tuple[str, int, torch.Tensor]]]]:
    """Split sequences into up to n micro-batches with balanced row counts (greedy, largest
    first); returns (original indices, items) per non-empty micro-batch."""
    order = sorted(range(len(items)), key=lambda i: -items[i][2].shape[0])
    groups: list[list[int]] = [[] for _ in range(min(n, len(items)))]
    load = [0] * len(groups)
    for i in order:
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += items[i][2].shape[0]
    return [(sorted(g), [items[i] for i in sorted(g)]) for g in groups if g]
