"""Drafts, their verification, and the exact rollback the lossless collaborative mode needs."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.decoder import ExitDecoder, StepResult
from tandem.runtime.kv_slots import SlotPool
from tandem.runtime.sampling import Sampler, SamplingParams
from tandem.runtime.speculative import Draft, judge, make_draft, target_distribution
from tests.runtime.test_decoder import ScriptedExits, _heads, _ids, assert_same_kv
from tests.tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rollback_is_exact(arch):
    """Feed a wrong branch (with deferred exits pending), roll back, feed the right one:
    KV and logits equal a sequence that only ever saw the right one."""
    model = tiny_model(arch)
    layers = (2, 3)
    rule = ScriptedExits([2, 3, None, 2, 2, 3, None, 2, 3, 2, 3, 2], layers)
    dec = ExitDecoder(model, _heads(model, layers), max_deferred=100, exit_rule=rule)
    ref = ExitDecoder(model)
    prompt, good, bad = _ids(5, 1), _ids(6, 2), _ids(6, 3)
    s, r = dec.new_sequence(), ref.new_sequence()
    dec.prefill([s], [prompt])
    ref.prefill([r], [prompt])
    for tok in good[:3] + bad:  # three right tokens, then a wrong branch
        dec.decode([s], [tok], tau=0.5)
        rule.next_step()
    s.truncate(len(prompt) + 3)
    assert s.length == len(prompt) + 3
    for tok in good[:3]:
        ref.decode([r], [tok])
    for tok in good[3:-1]:
        dec.decode([s], [tok], tau=0.5)
        ref.decode([r], [tok])
        rule.next_step()
    out = dec.decode([s], [good[-1]], tau=1.0)[0]  # full depth flushes the deferred rows
    want = ref.decode([r], [good[-1]])[0]
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert not s.pending
    assert_same_kv(s.kv, r.kv, model.cfg.n_layers)


def test_rollback_on_static_slots():
    model = tiny_model("qwen2")
    cfg = model.cfg
    pool = SlotPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, model.dtype, 2, 64)
    kv = pool.acquire(0, cfg.n_layers)
    ids = _ids(12, 4)
    model.forward_tokens([ids], [kv], [0])
    kv.truncate(7)
    logits = model.forward_tokens([_ids(3, 5)], [kv], [7])[0]
    want = model.forward_tokens([ids[:7] + _ids(3, 5)], [model.new_kv()], [0])[0]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        dec = ExitDecoder(model)
        seq = dec.new_sequence()
        seq.truncate(1)  # nothing fed yet


def test_greedy_judgement_accepts_only_the_argmax():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert judge(logits, Draft(0, 1), sampler).accepted
    j = judge(logits, Draft(0, 3), sampler)
    assert not j.accepted and j.token == 1
    assert j.prob == pytest.approx(float(torch.softmax(logits, -1)[1]))


def test_greedy_draft_maps_the_shortlist():
    step = StepResult(3, torch.tensor([0.1, 2.0, 0.3]), torch.tensor([40, 41, 42]))
    assert make_draft(7, step, Sampler(SamplingParams(temperature=0.0))) == Draft(7, 41)


def _tiny_model_logits() -> tuple[torch.Tensor, torch.Tensor, float]:
    """A tiny model's full-depth next-token logits and its logit lens at layer 3 (the
    draft), at the end of a prompt; and a temperature that makes p peaked enough for a
    chi-square test."""
    model = tiny_model("qwen2")
    ids = _ids(9, 11)
    with torch.inference_mode():
        full = model.forward_tokens([ids], [model.new_kv()], [0])[0]
        h = model.run_sequence(model.embed(torch.tensor(ids)), model.new_kv(0, 3), 0, 0, 3)
        lens = model.logits(h[-1:])[0]
    return full, lens, 0.1


def _random_logits() -> tuple[torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    return torch.randn(12) * 1.5, torch.randn(12) * 1.5, 0.9


@pytest.mark.parametrize(
    ("logits", "top_p"),
    [(_random_logits, 1.0), (_random_logits, 0.8), (_tiny_model_logits, 0.9)],
)
def test_speculative_sampling_keeps_the_target_distribution(logits, top_p):
    """Drafts drawn from a wrong q (random logits; a tiny model's logit lens at layer 3),
    judged against p (random logits; the tiny model's full depth): the accepted-or-replaced
    tokens must follow p (chi-square over 15k draws), and differ from q's distribution."""
    p_logits, q_logits, temperature = logits()
    vocab = p_logits.shape[0]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=3)
    edge = Sampler(params)
    cloud = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=4))
    p = target_distribution(p_logits, params)
    n = 15_000
    counts = torch.zeros(vocab)
    drafted = torch.zeros(vocab)
    step = StepResult(1, q_logits)
    for _ in range(n):
        d = make_draft(0, step, edge, top_k=6)
        drafted[d.token] += 1
        counts[judge(p_logits, d, cloud).token] += 1
    support = p > 0
    assert counts[~support].sum() == 0
    expected = p[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)
    q_chi2 = float(((drafted[support] - expected) ** 2 / expected).sum())
    assert q_chi2 > 10 * (dof + 5 * (2 * dof) ** 0.5)  # the drafts alone were far from p


def test_sampled_draft_must_carry_q():
    with pytest.raises(ValueError):
        judge(torch.zeros(4), Draft(0, 1), Sampler(SamplingParams(temperature=1.0, seed=1)))
