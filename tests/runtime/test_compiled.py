"""The compiled decode step (tandem.runtime.compiled, tandem.runtime.kv_slots) against the
eager reference path: same logits (fp32 tiny models), same KV, same greedy tokens (real)."""

from __future__ import annotations

import gc

import pytest
import torch

from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import ExitHead, ExitHeadConfig, decide
from tandem.runtime.kernels.int8 import Int8KernelLinear
from tandem.runtime.kv_cache import SequenceKV
from tandem.runtime.kv_slots import SlotKV, SlotPool
from tandem.runtime.quant import quantize_model
from tests.runtime.test_decoder import ScriptedExits, _heads, _ids, assert_same_kv
from tests.tiny import tiny_model


def _pair(arch: str, slots: int = 4):
    eager, fast = tiny_model(arch), tiny_model(arch)
    fast.compile_decode(slots)
    return eager, fast


def test_batched_decode_matches_eager(arch):
    """Three sequences of different lengths (gemma's sliding window is 5: the longer ones
    exceed it), decoded together over slots that start out as NaN (unwritten memory may hold
    anything); every step's logits equal the eager path's."""
    eager, fast = _pair(arch)
    for t in fast.compiled.pool.k + fast.compiled.pool.v:  # what unwritten memory may hold
        t.fill_(float("nan"))
    prompts = [_ids(3, 1), _ids(9, 2), _ids(12, 3)]
    decs = ExitDecoder(eager), ExitDecoder(fast)
    seqs = [[d.new_sequence() for _ in prompts] for d in decs]
    assert all(isinstance(s.kv, SlotKV) for s in seqs[1])
    for d, ss in zip(decs, seqs, strict=True):
        d.prefill(ss, prompts)
    for step in range(8):
        toks = _ids(3, 100 + step)
        want = decs[0].decode(seqs[0], toks)
        got = decs[1].decode(seqs[1], toks)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.logits, w.logits, atol=1e-4, rtol=1e-4)
    assert fast.compiled is not None and (0, fast.cfg.n_layers) in fast.compiled._graphs
    # The steps after the first called dynamo's compiled code directly (no frame hook).
    assert (0, fast.cfg.n_layers) in fast.compiled._direct
    for s, r in zip(seqs[1], seqs[0], strict=True):
        assert_same_kv(s.kv, r.kv, fast.cfg.n_layers)


def test_deferred_exits_are_exact_compiled():
    """Scripted exits: the ranges between exits run as their own graphs, pending rows join
    them; the KV and final logits equal the eager full-depth reference."""
    eager, fast = _pair("llama")
    layers = (2, 3, 5)
    script = [2, 3, 5, None, 5, 2, 2, 3, None, 3, 2]
    rule = ScriptedExits(script, layers)
    dec = ExitDecoder(fast, _heads(fast, layers), max_deferred=100, exit_rule=rule)
    ref = ExitDecoder(eager)
    prompt, tokens = _ids(4, 7), _ids(len(script) + 1, 8)
    s, r = dec.new_sequence(), ref.new_sequence()
    dec.prefill([s], [prompt])
    ref.prefill([r], [prompt])
    for i, tok in enumerate(tokens):
        out = dec.decode([s], [tok], tau=0.5 if i < len(script) else 1.0)
        rule.next_step()
        expected = ref.decode([r], [tok])[0]
    assert not s.pending
    assert {(0, 2), (2, 3), (3, 5), (5, 6)} <= set(fast.compiled._graphs)
    torch.testing.assert_close(out[0].logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert_same_kv(s.kv, r.kv, fast.cfg.n_layers)


def _calibrated_heads(model, layers: tuple[int, ...]) -> list[ExitHead]:
    """Heads with a consistency classifier and nonzero trained parts (random, seeded)."""
    gen = torch.Generator().manual_seed(3)
    heads = []
    for layer in layers:
        cfg = ExitHeadConfig(layer, model.cfg.hidden_size, 8, 16, calibrated=True)
        head = ExitHead(cfg, 1e-6, False)
        head.shortlist.copy_(torch.arange(16))
        head.attach_lm_head(model.lm_head.weight)
        with torch.no_grad():
            for p in head.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        heads.append(head.eval())
    return heads


def test_compiled_exit_heads_follow_eager():
    """A compiled model's decoder calls each exit head as one graph: the same top class and
    logits as the eager head up to fp32 summation order, alone or batched; the exits taken
    (tau 0.5) and the final logits match the eager decoder."""
    eager, fast = _pair("llama")
    layers = (2, 4)
    heads = _calibrated_heads(fast, layers)
    dec, ref = ExitDecoder(fast, heads), ExitDecoder(eager, _calibrated_heads(eager, layers))
    h = torch.randn(3, fast.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for head in heads:
            want = head(h)
            got, verdict = dec.judge(head, h, 0.5)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            ref_verdict = decide(want, head.shortlist, 0.5)
            assert torch.equal(verdict.token, ref_verdict.token)
            torch.testing.assert_close(verdict.prob, ref_verdict.prob, atol=1e-5, rtol=1e-5)
            alone = torch.cat([dec.judge(head, h[i : i + 1], 0.5)[0] for i in range(3)])
            torch.testing.assert_close(alone, want, atol=1e-5, rtol=1e-5)
            # After the first call of each kind, calls skip dynamo (the code it compiled,
            # called directly): the same bits as through dynamo, at a row count and a tau
            # not seen (tau is an input of the graph, not a constant of it).
            compiled = fast.compiled.head(head, decide)
            assert len(compiled._direct) == 2
            h5 = torch.randn(5, fast.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
            direct, through = dec.judge(head, h5, 0.37), compiled.graph(h5, torch.tensor(0.37))
            assert torch.equal(direct[0], through[0])
            assert torch.equal(direct[1].confident, through[1])
            eager_verdict = decide(direct[0], head.shortlist, 0.37)
            assert torch.equal(direct[1].confident, eager_verdict.confident)
    assert len(fast.compiled._heads) == len(layers)
    prompt, tokens = _ids(4, 7), _ids(10, 8)
    s, r = dec.new_sequence(), ref.new_sequence()
    dec.prefill([s], [prompt])
    ref.prefill([r], [prompt])
    exits = []
    for tok in tokens:
        got, want = dec.decode([s], [tok], tau=0.5)[0], ref.decode([r], [tok], tau=0.5)[0]
        assert got.exit_layer == want.exit_layer
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        exits.append(got.exit_layer)
    assert len(set(exits)) > 1, exits  # the heads passed some tokens and not others


def test_sequences_beyond_the_slots_fall_back_to_eager():
    """With 2 slots, a third sequence gets a dynamic cache; a batch mixing both runs the eager
    layers and stays exact; a released slot is reused."""
    eager, fast = _pair("qwen2", slots=2)
    dec, ref = ExitDecoder(fast), ExitDecoder(eager)
    seqs = [dec.new_sequence() for _ in range(3)]
    assert [type(s.kv) for s in seqs] == [SlotKV, SlotKV, SequenceKV]
    refs = [ref.new_sequence() for _ in range(3)]
    prompts = [_ids(4, 1), _ids(6, 2), _ids(5, 3)]
    dec.prefill(seqs, prompts)
    ref.prefill(refs, prompts)
    for step in range(3):
        toks = _ids(3, 50 + step)
        for g, w in zip(dec.decode(seqs, toks), ref.decode(refs, toks), strict=True):
            torch.testing.assert_close(g.logits, w.logits, atol=1e-4, rtol=1e-4)
    assert fast.compiled.pool.free == 0
    del seqs[0]
    gc.collect()
    assert fast.compiled.pool.free == 1
    assert isinstance(dec.new_sequence().kv, SlotKV)


def test_slot_capacity_is_an_explicit_error():
    pool = SlotPool(1, 2, 4, torch.float32, slots=1, capacity=3)
    kv = pool.acquire(0, 1)
    kv.append(0, torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="capacity"):
        kv.append(0, torch.ones(2, 1, 4), torch.ones(2, 1, 4))
    assert pool.acquire(0, 1) is None
    kv.release()
    assert pool.free == 1


def _compiled_equals_eager(model_id: str, steps: int = 24) -> None:
    """`model_id` as served (its default quantization), two prompts decoded together on the
    eager and the compiled path: every step's logits are equal bit for bit, so the greedy
    tokens are the same.

    Both paths run the same kernels for everything that reduces (the int4/int8 matmuls,
    RMSNorm, decode attention) and inductor keeps eager's bf16 roundings between the ops it
    fuses (`emulate_precision_casts`). Any other arithmetic in the graph (a reduction of its
    own, a fused op rounding once) parts them within a few steps, because int8 activations
    turn a one-ulp difference into other tokens."""
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    torch.set_num_threads(2)
    spec = ModelRegistry().get(model_id)
    lms = [
        load_model(spec, LoadOptions(quant=spec.default_quant, exits=False, compiled=c))
        for c in (False, True)
    ]
    decs, codec = [lm.decoder() for lm in lms], lms[0].codec
    prompts = [codec.encode(t) for t in ("The history of London begins", "def reverse(s):")]
    seqs = [[d.new_sequence() for _ in prompts] for d in decs]
    assert isinstance(seqs[1][0].kv, SlotKV)
    results = [d.prefill(s, prompts) for d, s in zip(decs, seqs, strict=True)]
    for step in range(steps):
        toks = []
        for eager, fast in zip(*results, strict=True):
            diff = (eager.logits.float() - fast.logits.float()).abs().max()
            assert torch.equal(eager.logits, fast.logits), f"step {step}: logits differ by {diff}"
            toks.append(int(fast.logits.argmax()))
        results = [d.decode(s, toks) for d, s in zip(decs, seqs, strict=True)]


@pytest.mark.slow
def test_compiled_follows_eager_on_smollm2():
    _compiled_equals_eager("smollm2")


@pytest.mark.slow
def test_compiled_follows_eager_on_qwen05():
    _compiled_equals_eager("qwen05")


def test_a_sequence_takes_the_same_arithmetic_alone_or_batched(arch):
    """With int8 activations (Tandem's int8 kernel) a one-ulp difference can become another
    greedy token, so a sequence's numbers must not depend on the batch it runs in: its
    logits alone equal its logits batched with others bit for bit. Covers a prompt longer
    than `max_rows` (eager) prefilled beside short ones (compiled), and decode steps of one
    row (run as two) against steps of three."""
    model = quantize_model(tiny_model(arch, dtype=torch.bfloat16), "int8")
    assert any(isinstance(m, Int8KernelLinear) for m in model.modules())
    model.compile_decode(8)
    assert model.compiled is not None and model.compiled.max_rows < 40
    dec = ExitDecoder(model)
    prompts = [_ids(3, 1), _ids(40, 2), _ids(9, 3)]
    alone = [dec.new_sequence() for _ in prompts]
    together = [dec.new_sequence() for _ in prompts]
    want = [dec.prefill([s], [p])[0] for s, p in zip(alone, prompts, strict=True)]
    got = dec.prefill(together, prompts)
    for step in range(6):
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w.logits, g.logits), f"step {step}"
        toks = _ids(3, 50 + step)
        want = [dec.decode([s], [t])[0] for s, t in zip(alone, toks, strict=True)]
        got = dec.decode(together, toks)
