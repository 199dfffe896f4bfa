"""Runtime correctness on tiny random models against transformers, and the exactness of
batched decoding and deferred early exit."""

from __future__ import annotations

import torch

from tandem.runtime.config import ArchConfig
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import ExitDecision, ExitHead, ExitHeadConfig
from tandem.runtime.model import DecoderModel, Segment
from tests.tiny import tiny_model, tiny_reference


def _ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def test_logits_match_transformers_every_position(arch):
    ref = tiny_reference(arch)
    model = DecoderModel.from_state_dict(
        ArchConfig.from_hf(ref.config.to_dict()), ref.state_dict(), torch.float32
    )
    ids = _ids(16)  # longer than gemma's test sliding window (5)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    kv = model.new_kv()
    with torch.inference_mode():
        h = model.embed(torch.tensor(ids))
        h = model.run_layers(h, torch.arange(16), [Segment(kv, 0, 16, 0)], 0, model.cfg.n_layers)
        got = model.logits(h)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_incremental_decode_matches_prefill(arch):
    model = tiny_model(arch)
    ids = _ids(14)
    full = model.forward_tokens([ids], [model.new_kv()], [0])[0]
    dec = ExitDecoder(model)
    seq = dec.new_sequence()
    dec.prefill([seq], [ids[:3]])
    for tok in ids[3:]:
        step = dec.decode([seq], [tok])[0]
    torch.testing.assert_close(step.logits, full, atol=1e-5, rtol=1e-5)


def test_layer_ranges_compose(arch):
    model = tiny_model(arch)
    ids = _ids(7)
    pos = torch.arange(7)
    with torch.inference_mode():
        kv_a, kv_b = model.new_kv(), model.new_kv()
        h = model.embed(torch.tensor(ids))
        whole = model.run_layers(h, pos, [Segment(kv_a, 0, 7, 0)], 0, 6)
        split = model.run_layers(h, pos, [Segment(kv_b, 0, 7, 0)], 0, 2)
        split = model.run_layers(split, pos, [Segment(kv_b, 0, 7, 0)], 2, 6)
    torch.testing.assert_close(split, whole)


def test_batched_decode_equals_one_by_one(arch):
    model = tiny_model(arch)
    prompts = [_ids(3, 1), _ids(9, 2), _ids(6, 3)]
    follow = [_ids(5, 4), _ids(5, 5), _ids(5, 6)]
    dec = ExitDecoder(model)
    seqs = [dec.new_sequence() for _ in prompts]
    dec.prefill(seqs, prompts)
    for t in range(5):
        batched = dec.decode(seqs, [f[t] for f in follow])
    for i, (p, f) in enumerate(zip(prompts, follow, strict=True)):
        alone = model.forward_tokens([p + f], [model.new_kv()], [0])[0]
        torch.testing.assert_close(batched[i].logits, alone, atol=1e-5, rtol=1e-5)


def assert_same_kv(kv, ref, n_layers: int) -> None:
    """Every layer of `kv` holds as many positions as `ref`, with the same K and V."""
    for layer in range(n_layers):
        assert kv.length(layer) == ref.length(layer)
        for got, want in zip(kv.view(layer), ref.view(layer), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _heads(model: DecoderModel, layers: tuple[int, ...]) -> list[ExitHead]:
    heads = []
    for layer in layers:
        head = ExitHead(ExitHeadConfig(layer, model.cfg.hidden_size, 8, 16), 1e-6, False)
        head.shortlist.copy_(torch.arange(16))
        head.attach_lm_head(model.lm_head.weight)
        heads.append(head.eval())
    return heads


class ScriptedExits:
    """Decides exits from a fixed script instead of confidence: script[step] = exit layer
    (or None = full depth) for the single sequence under test."""

    def __init__(self, script: list[int | None], layers: tuple[int, ...]) -> None:
        self.script = script
        self.layers = layers
        self.step = 0
        self.calls_this_step = 0

    def __call__(self, logits, shortlist, tau) -> ExitDecision:
        layer = self.layers[self.calls_this_step]
        want = self.script[self.step]
        self.calls_this_step += 1
        go = want is not None and want == layer
        return ExitDecision(
            confident=torch.tensor([go] * logits.shape[0]),
            token=shortlist[torch.zeros(logits.shape[0], dtype=torch.long)],
            prob=torch.ones(logits.shape[0]),
        )

    def next_step(self) -> None:
        self.step += 1
        self.calls_this_step = 0


def test_deferred_exit_kv_is_exact(arch):
    """Tokens exit at scripted layers; the skipped KV is filled later by deferred rows.
    After a full-depth token, every layer's KV and the logits equal full computation."""
    model = tiny_model(arch)
    layers = (2, 3, 5)
    script = [2, 3, 5, None, 5, 2, 2, 3, None, 3, 2]
    rule = ScriptedExits(script, layers)
    dec = ExitDecoder(model, _heads(model, layers), max_deferred=100, exit_rule=rule)
    ref = ExitDecoder(model)
    prompt, tokens = _ids(4, 7), _ids(len(script) + 1, 8)
    s, r = dec.new_sequence(), ref.new_sequence()
    dec.prefill([s], [prompt])
    ref.prefill([r], [prompt])
    seen = []
    for i, tok in enumerate(tokens):
        if i < len(script):
            out = dec.decode([s], [tok], tau=0.5)[0]
            seen.append(out.exit_layer)
            rule.next_step()
        else:  # final token: no exits, flushes every pending row
            out = dec.decode([s], [tok], tau=1.0)[0]
        expected = ref.decode([r], [tok])[0]
    assert seen == [x if x is not None else model.cfg.n_layers for x in script]
    assert not s.pending
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert_same_kv(s.kv, r.kv, model.cfg.n_layers)
    assert all(r.kv.length(i) == len(prompt) + len(tokens) for i in range(model.cfg.n_layers))


def test_deferred_rows_are_capped():
    model = tiny_model("llama")
    layers = (2,)
    rule = ScriptedExits([2] * 20, layers)
    dec = ExitDecoder(model, _heads(model, layers), max_deferred=3, exit_rule=rule)
    s = dec.new_sequence()
    dec.prefill([s], [_ids(3)])
    exits = []
    for tok in _ids(10):
        exits.append(dec.decode([s], [tok], tau=0.5)[0].exit_layer)
        rule.next_step()
        assert s.pending_rows() <= 3
    assert model.cfg.n_layers in exits  # the cap forced full-depth tokens


def test_confidence_rule_exits_only_above_tau():
    from tandem.runtime.exit_head import decide

    shortlist = torch.tensor([10, 11, 12])
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    d = decide(logits, shortlist, 0.9)
    assert d.confident.tolist() == [True, False, False]  # row 2's top class is "other"
    assert int(d.token[0]) == 10
    assert not decide(logits, shortlist, 1.0).confident.any()


def test_split_mode_uploads_every_position_exactly_once(arch):
    """Split mode (edge half of CE-CoLLM): tokens exit early, at the split head, or reach
    the split unconfident. The split-layer states reported as `reached` cover every
    position once, in order, and equal running layers [0, split) over the whole text."""
    model = tiny_model(arch)
    depth, layers = 4, (2, 4)
    script = [None, 2, 4, None, 2, 2, 4, None, 2, None]
    rule = ScriptedExits(script, layers)
    dec = ExitDecoder(model, _heads(model, layers), max_deferred=100, exit_rule=rule, depth=depth)
    assert dec.split and dec.exit_layers == (2,) and dec.split_head is not None
    prompt, tokens = _ids(5, 3), _ids(len(script) - 1, 4)
    s = dec.new_sequence()
    steps = [dec.prefill([s], [prompt], tau=0.5)[0]]
    rule.next_step()
    for tok in tokens:
        steps.append(dec.decode([s], [tok], tau=0.5)[0])
        rule.next_step()
    exits = [st.exit_layer if st.confident else None for st in steps]
    assert exits == script
    reached = [st.reached for st in steps if st.reached is not None]
    assert [r.start_pos for r in reached] == sorted(r.start_pos for r in reached)
    got = torch.cat([r.hidden for r in reached])
    last = reached[-1]
    assert last.start_pos + last.hidden.shape[0] == len(prompt) + len(tokens)
    kv = model.new_kv(0, depth)
    want = model.run_sequence(model.embed(torch.tensor(prompt + tokens)), kv, 0, 0, depth)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_target_logprob_uses_the_class_or_spreads_other():
    import math

    from tandem.runtime.exit_head import target_logprob

    shortlist = torch.tensor([10, 11, 12])
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    lp = torch.log_softmax(logits, -1)
    got = target_logprob(logits, shortlist, torch.tensor([11, 99]), vocab_size=103)
    torch.testing.assert_close(got, torch.stack([lp[0, 1], lp[1, 3] - math.log(100)]))
