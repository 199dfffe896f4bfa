"""MoE² gate: mixture math, subset renormalisation, training, top-k, save/load.

Synthetic data only (no models): two feature clusters, "prose" and "code", and experts
whose NLL depends on the cluster.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from services.router.gate import (
    Gate,
    GateConfig,
    masked_log_weights,
    mixture_loss,
    monotonicity_violations,
    oracle_loss,
    subsets,
    train_gate,
    uniform_loss,
)
from services.router.gate_data import DEFAULT_PATH, GateData, cut, load, save

EXPERTS = ("prose_pro", "code_pro", "meh")


def synthetic(n: int = 120, dim: int = 8, seed: int = 0) -> GateData:
    """Prose prompts: prose_pro is good (NLL 20), code_pro bad (60); code the reverse;
    'meh' is 40 on both. Features: a cluster mean per category plus noise."""
    rng = np.random.default_rng(seed)
    is_code = np.arange(n) % 2 == 1
    centers = np.stack([np.full(dim, -1.0), np.full(dim, 1.0)])
    features = centers[is_code.astype(int)] + 0.3 * rng.standard_normal((n, dim))
    nll = np.where(is_code[:, None], [60.0, 20.0, 40.0], [20.0, 60.0, 40.0])
    nll = nll + rng.uniform(0, 2, size=nll.shape)
    cats = tuple("stdlib" if c else "fortunes" for c in is_code)
    return GateData(EXPERTS, features.astype(np.float32), nll, np.full(n, 50), cats)


def zero_gate(data: GateData, bias: list[float]) -> Gate:
    gate = Gate(data.experts, data.features.mean(0), data.features.std(0) + 1e-6)
    with torch.no_grad():
        gate.net.weight.zero_()
        gate.net.bias.copy_(torch.tensor(bias))
    return gate.eval()


def test_mixture_loss_matches_hand_computation() -> None:
    # Two prompts, 3 experts, fixed gate weights from the bias only.
    data = GateData(
        EXPERTS,
        np.array([[0.0], [1.0]], dtype=np.float32),
        np.array([[10.0, 12.0, 30.0], [4.0, 2.0, 9.0]]),
        np.array([20, 10]),
        ("a", "b"),
    )
    bias = [math.log(3.0), math.log(1.0), math.log(0.0001)]
    gate = zero_gate(data, bias)
    w = np.array([3.0, 1.0, 0.0001])
    w /= w.sum()
    expect = -sum(math.log(np.dot(w, np.exp(-row))) for row in data.nll) / 30 / math.log(2)
    assert mixture_loss(gate, data) == pytest.approx(expect, rel=1e-9)
    # Subset {prose_pro, code_pro}: weights 3/4, 1/4.
    w2 = np.array([0.75, 0.25])
    expect2 = -sum(math.log(np.dot(w2, np.exp(-row[:2]))) for row in data.nll) / 30 / math.log(2)
    assert mixture_loss(gate, data, ["code_pro", "prose_pro"]) == pytest.approx(expect2)
    # A single expert is that expert's own bits/char.
    assert mixture_loss(gate, data, ["meh"]) == pytest.approx(39 / 30 / math.log(2))
    # Top-1 of all: prose_pro (largest logit) alone.
    assert mixture_loss(gate, data, top_k=1) == pytest.approx(14 / 30 / math.log(2))


def test_renormalised_subset_equals_masking_the_softmax() -> None:
    data = synthetic()
    gate = train_gate(data, config=GateConfig(steps=50))
    full = gate.weights(data.features)
    for s in subsets(EXPERTS):
        idx = [EXPERTS.index(e) for e in s]
        by_hand = np.zeros_like(full)
        by_hand[:, idx] = full[:, idx] / full[:, idx].sum(1, keepdims=True)
        np.testing.assert_allclose(gate.weights(data.features, s), by_hand, atol=1e-6)


def test_top_k_keeps_the_k_largest_logits_within_subset() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([True, False, True, True])
    w = masked_log_weights(logits, mask, top_k=2).exp()[0]
    soft = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(w, torch.tensor([soft[0], 0.0, soft[1], 0.0]))
    # k >= |S| is plain renormalisation.
    torch.testing.assert_close(
        masked_log_weights(logits, mask, 5), masked_log_weights(logits, mask)
    )
    with pytest.raises(ValueError):
        masked_log_weights(logits, mask, 0)


def test_training_lowers_loss_and_routes_by_category() -> None:
    train, test = synthetic(seed=0), synthetic(seed=1)
    uniform = uniform_loss(test)
    gate = train_gate(train, seed=0, val=synthetic(seed=2))
    trained = mixture_loss(gate, test)
    # Uniform pays log(3) nats per prompt over 50 chars (~0.03 bits/char); the gate ~0.
    assert trained < uniform - 0.025
    assert trained == pytest.approx(oracle_loss(test), abs=0.005)
    top = gate.scores(test.features).argmax(1)
    want = np.array([1 if c == "stdlib" else 0 for c in test.categories])
    assert (top == want).mean() > 0.95
    # Restricted to {code_pro, meh}, prose prompts go to meh (the better of the two there).
    w = gate.weights(test.features, ["code_pro", "meh"])
    prose = np.array([c == "fortunes" for c in test.categories])
    assert (w[prose].argmax(1) == 2).mean() > 0.95
    # Nearly monotone: a fixed theta* leaks a little weight to a useless added expert.
    _, pairs, worst = monotonicity_violations(gate, test)
    assert pairs == 12 and worst < 0.005


def test_retrained_on_subset_matches_restricted_full_gate() -> None:
    train, test = synthetic(seed=0), synthetic(seed=1)
    full = train_gate(train)
    top = ("prose_pro", "code_pro")
    assert mixture_loss(full, test, top) == pytest.approx(
        mixture_loss(train_gate(train, top), test, top), abs=0.001
    )
    # Where theta* gives both members of S ~0 weight (code prompts, S without code_pro) the
    # training signal on their relative logit vanished: restriction is close, not equal.
    weak = ("prose_pro", "meh")
    gap = mixture_loss(full, test, weak) - mixture_loss(train_gate(train, weak), test, weak)
    assert -0.001 < gap < 0.02


def test_save_load_round_trip(tmp_path: Path) -> None:
    data = synthetic()
    for hidden in (0, 16):
        gate = train_gate(data, config=GateConfig(hidden=hidden, steps=20))
        gate.save(tmp_path / f"g{hidden}.pt")
        back = Gate.load(tmp_path / f"g{hidden}.pt")
        assert back.experts == EXPERTS
        np.testing.assert_allclose(back.scores(data.features), gate.scores(data.features))


def test_subset_validation() -> None:
    gate = train_gate(synthetic(), config=GateConfig(steps=1))
    with pytest.raises(KeyError):
        gate.mask(["nope"])
    with pytest.raises(ValueError):
        gate.mask([])
    assert len(subsets(EXPERTS, 2)) == 4
    assert len(subsets(("a", "b", "c", "d"), 2)) == 11


def test_cut_splits_at_whitespace_and_respects_the_filter() -> None:
    text = "The quick brown fox jumps over the lazy dog and keeps on running far away."
    prompt, cont = cut(text, 30, 20, lambda p, c: True)
    assert text.startswith(prompt + cont)
    assert len(prompt) <= 30 and cont[0] == " " and len(cont) <= 20
    # The filter can force an earlier cut.
    p2, _ = cut(text, 30, 20, lambda p, c: not p.endswith("over"))
    assert p2 != "The quick brown fox jumps over" and len(p2) <= 30
    assert cut("short text", 30, 20, lambda p, c: True) is None


def test_gate_data_save_load_round_trip(tmp_path: Path) -> None:
    d = synthetic(n=6)
    d = GateData(d.experts, d.features, d.nll, d.chars, d.categories, tuple("abcdef"))
    save({"train": d, "val": d, "test": d}, {"seed": 0}, tmp_path / "g.npz")
    back = load(tmp_path / "g.npz")["val"]
    assert back.experts == EXPERTS and back.categories == d.categories and back.prompts == d.prompts
    np.testing.assert_array_equal(back.nll, d.nll)
    np.testing.assert_array_equal(back.features, d.features)
    np.testing.assert_array_equal(back.chars, d.chars)


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_PATH.exists(), reason="no cached gate data (make gate-data)")
def test_real_gate_data_beats_uniform_and_features_match_runtime() -> None:
    from services.router.gate_data import prompt_features
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    splits = load(DEFAULT_PATH)
    assert {len(d.experts) for d in splits.values()} == {4}
    # A budgeted gate-data leaves the largest expert unscored on some prompts (NaN):
    # training takes them as they are, the comparison needs every expert's loss.
    gate = train_gate(splits["train"], val=splits["val"].complete())
    test = splits["test"].complete()
    assert mixture_loss(gate, test) < uniform_loss(test)
    if not test.prompts:
        pytest.skip("gate data cached without prompt texts")
    spec = ModelRegistry().get("smollm2")
    lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
    f = prompt_features(lm, test.prompts[:3])
    cos = (f * test.features[:3]).sum(1) / np.linalg.norm(f, axis=1)
    cos /= np.linalg.norm(test.features[:3], axis=1)
    assert cos.min() > 0.999
