"""The CUDA-graph decode's bookkeeping on the CPU: row and length buckets, padding rows on
the scratch slot, static inputs refilled per step. The capture is replaced by an eager
call on the same static buffers (what a replay computes), so everything but the CUDA
graph itself is checked here; tests/gpu checks the real graphs."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tandem.runtime.compiled import CudaGraphDecode, _bucket, _Captured
from tandem.runtime.decoder import ExitDecoder
from tests.runtime.test_decoder import _ids, assert_same_kv
from tests.tiny import tiny_model


class EagerReplay(CudaGraphDecode):
    """`replay()` runs the layer-range module eagerly on the static buffers."""

    def _capture(self, start, end, rows, length):
        module = self._module(start, end)
        cap = _Captured(None, *self._static_inputs(rows), None)

        def replay() -> None:
            cap.out = module(cap.h, cap.slot, cap.pos, length)

        cap.graph = SimpleNamespace(replay=replay)
        return cap


def test_buckets():
    assert [_bucket(n, 1, 32) for n in (1, 2, 3, 5, 8, 9, 32, 40)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert [_bucket(n, 64, 200) for n in (1, 64, 65, 129, 500)] == [64, 64, 128, 200, 200]


def test_padded_bucketed_steps_equal_eager(arch):
    eager, fast = tiny_model(arch), tiny_model(arch)
    fast.compiled = EagerReplay(fast, slots=4)
    for t in fast.compiled.pool.k + fast.compiled.pool.v:
        t.zero_()  # what the GPU pool starts as
    scratch = fast.compiled._scratch.slot
    prompts = [_ids(3, 1), _ids(9, 2), _ids(70, 3)]  # crosses the 64-position bucket
    decs = ExitDecoder(eager), ExitDecoder(fast)
    seqs = [[d.new_sequence() for _ in prompts] for d in decs]
    assert scratch not in {s.kv.slot for s in seqs[1]}
    for d, ss in zip(decs, seqs, strict=True):
        d.prefill(ss, prompts)
    for step in range(4):
        toks = _ids(3, 100 + step)
        want = decs[0].decode(seqs[0], toks)
        got = decs[1].decode(seqs[1], toks)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.logits, w.logits, atol=1e-4, rtol=1e-4)
    keys = set(fast.compiled._captured)
    assert (0, fast.cfg.n_layers, 4, 128) in keys  # 3 rows -> 4, length 74 -> 128
    cap = fast.compiled._captured[0, fast.cfg.n_layers, 4, 128]
    assert cap.slot[-1].item() == scratch and cap.pos[-1].item() == 0  # the padding row
    for s, r in zip(seqs[1], seqs[0], strict=True):
        assert_same_kv(s.kv, r.kv, fast.cfg.n_layers)
