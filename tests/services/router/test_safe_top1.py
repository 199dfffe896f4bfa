"""SafeTop1 (top-1 routing that abstains to the prior) and the leave-one-domain-out
evaluation, on synthetic gate data where the answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import services.router.gate_lodo as lodo
from services.router.gate import GateConfig
from services.router.gate_data import GateData
from services.router.gate_lodo import bootstrap_delta, evaluate_subset, restrict
from services.router.safe_top1 import (
    RESIDUAL_FLOOR,
    SafeTop1,
    SafeTop1Config,
    Support,
    fit_threshold,
    route,
)

EXPERTS = ("a", "b")
LN2 = math.log(2)
FAST = GateConfig(steps=30)  # the softmax gate is not what these tests check


def data(signal: bool, seed: int = 0, n_dom: int = 6, per: int = 60) -> GateData:
    """Expert b is better than a by 0.5 bits/char exactly where feature 0 > 0 (``signal``),
    else the sign of feature 0 says nothing; b is a little worse on average (a is the prior)."""
    rng = np.random.default_rng(seed)
    doms = np.repeat([f"d{i}" for i in range(n_dom)], per)
    x = rng.normal(size=(len(doms), 8)).astype(np.float32)
    chars = np.full(len(doms), 40)
    good = x[:, 0] > 0 if signal else rng.random(len(doms)) < 0.5
    rate_a = np.full(len(doms), 1.2)
    rate_b = np.where(good, 0.7, 1.9)
    nll = np.stack([rate_a, rate_b], 1) * chars[:, None] * LN2
    return GateData(EXPERTS, x, nll, chars, tuple(doms))


def test_route_abstains_below_the_threshold() -> None:
    pred = np.array([[1.0, 0.8], [1.0, 0.95], [1.0, 1.2]])
    assert route(pred, 0, 0.1).tolist() == [1, 0, 0]
    assert route(pred, 0, math.inf).tolist() == [0, 0, 0]
    assert route(pred, 1, 0.0).tolist() == [1, 1, 0]


def test_a_real_signal_is_routed_and_beats_the_prior() -> None:
    d = data(signal=True)
    safe = SafeTop1.fit(EXPERTS, d.features, d.nll, d.chars, d.categories, [EXPERTS], mode="ridge")
    assert safe.priors[EXPERTS] == "a" and math.isfinite(safe.taus[EXPERTS])
    res = evaluate_subset(d, EXPERTS, FAST)
    point, lo, hi = bootstrap_delta(res, "safe top-1", draws=300)
    assert hi < 0 and lo <= point <= hi  # better than the prior, significantly
    assert res.bpc("oracle") <= res.bpc("safe top-1") < res.bpc("prior")


def test_no_signal_means_the_prior_and_never_worse() -> None:
    d = data(signal=False, seed=1)
    safe = SafeTop1.fit(EXPERTS, d.features, d.nll, d.chars, d.categories, [EXPERTS], mode="ridge")
    picks = safe.choose(d.features, EXPERTS)
    assert picks.count("a") >= 0.9 * len(picks)  # abstains (almost) always
    res = evaluate_subset(d, EXPERTS, FAST)
    _, lo, _ = bootstrap_delta(res, "safe top-1", draws=300)
    assert lo <= 0.0  # never worse than the prior beyond its interval


def test_state_round_trip_and_missing_scores() -> None:
    d = data(signal=True, seed=2)
    nll = d.nll.copy()
    nll[::3, 1] = np.nan  # b not scored on a third of the prompts
    safe = SafeTop1.fit(EXPERTS, d.features, nll, d.chars, d.categories, [EXPERTS], mode="ridge")
    back = SafeTop1.from_state(json.loads(json.dumps(safe.to_state())))  # as gate.pt holds it
    assert back.choose(d.features, EXPERTS) == safe.choose(d.features, EXPERTS)
    assert back.regressor.basis is back.support  # the ridge's basis is the support, kept once
    assert back.support.limit == safe.support.limit and math.isfinite(back.support.limit)
    assert len(restrict(GateData(EXPERTS, d.features, nll, d.chars, d.categories), EXPERTS)) == (
        len(d) - len(range(0, len(d), 3))
    )


def test_gate_mode_routes_a_real_signal_by_the_gates_margin() -> None:
    d = data(signal=True, seed=4)
    safe = SafeTop1.fit(
        EXPERTS,
        d.features,
        d.nll,
        d.chars,
        d.categories,
        [EXPERTS],
        SafeTop1Config(pca=6),  # fewer components than the 8 features: a real residual
        mode="gate",
        gate_config=FAST,
    )
    assert safe.mode == "gate" and math.isfinite(safe.taus[EXPERTS])
    logits = np.stack([np.zeros(len(d)), np.where(d.features[:, 0] > 0, 5.0, -5.0)], 1)
    picks = safe.choose(d.features, EXPERTS, logits)
    covered = safe.support.covers(d.features)  # ~5% of the rows lie off the support
    assert 0.9 <= covered.mean() < 1.0
    assert picks == [
        "b" if x > 0 and c else "a" for x, c in zip(d.features[:, 0], covered, strict=True)
    ]
    back = SafeTop1.from_state(safe.to_state())
    assert back.mode == "gate" and back.choose(d.features, EXPERTS, logits) == picks


def test_bootstrap_delta_is_zero_for_identical_methods() -> None:
    res = evaluate_subset(data(signal=False, seed=3, n_dom=3, per=40), EXPERTS, FAST)
    assert bootstrap_delta(res, "prior", draws=100) == (0.0, 0.0, 0.0)
    assert SafeTop1Config().min_inner_domains >= 2


def test_a_prompt_off_the_training_support_goes_to_the_prior() -> None:
    """Training features of rank 4 in 12 dimensions (as real gate features, which span far
    fewer directions than they have), the support fitted on 4 principal components."""
    d = data(signal=True, seed=5)
    mix = np.random.default_rng(1).normal(size=(8, 12))
    mix[:, 4:] = mix[:, :4] @ np.random.default_rng(2).normal(size=(4, 8)) / 2.0
    feats = (d.features @ mix).astype(np.float32)
    feats[:, 0] = d.features[:, 0]  # the signal stays readable
    cfg = SafeTop1Config(pca=5)
    safe = SafeTop1.fit(EXPERTS, feats, d.nll, d.chars, d.categories, [EXPERTS], cfg)
    inside = feats[feats[:, 0] > 1.0][:5]
    assert safe.support.covers(inside).all()
    assert safe.choose(inside, EXPERTS) == ["b"] * 5  # a large margin, like the training text
    # The same margin direction, far off the training features' principal subspace: a
    # direction (with huge values) the fit never saw.
    far = inside.copy()
    far[:, 1:] += 40.0 * np.sign(np.random.default_rng(0).normal(size=(5, 11)))
    assert not safe.support.covers(far).any()
    assert safe.choose(far, EXPERTS) == ["a"] * 5
    off = SafeTop1.fit(
        EXPERTS, feats, d.nll, d.chars, d.categories, [EXPERTS], SafeTop1Config(support=1.0)
    )
    assert off.support.covers(far).all()


def test_where_the_subspace_spans_the_features_every_prompt_is_covered() -> None:
    """8 features, 16 components: residuals are rounding, and the floor covers them all
    (a quantile of rounding covered prompts by chance, differently on different CPUs)."""
    d = data(signal=True, seed=5)
    safe = SafeTop1.fit(EXPERTS, d.features, d.nll, d.chars, d.categories, [EXPERTS])
    assert safe.support.limit >= RESIDUAL_FLOOR
    assert safe.support.covers(d.features).all()


def test_support_keeps_the_quantile_of_training_residuals() -> None:
    x = np.random.default_rng(0).normal(size=(400, 12))
    s = Support.fit(x, SafeTop1Config(pca=4, support=0.9))
    assert 0.88 <= s.covers(x).mean() <= 0.92


def test_point_rule_blocks_a_threshold_that_makes_one_inner_domain_slightly_worse() -> None:
    """Routing helps on five domains and costs a little on the sixth: the bootstrap check
    (alpha 0.025) lets a noisy small loss through, the point rule does not."""
    rng = np.random.default_rng(6)
    doms = np.repeat([f"d{i}" for i in range(6)], 60)
    x = rng.uniform(1.0, 2.0, size=(len(doms), 4))  # column 0: the margin of b over a
    chars = np.full(len(doms), 40)
    rate_a = np.full(len(doms), 1.0)
    wobble = np.tile([0.12, -0.12], len(doms) // 2)  # mean 0: d5 loses exactly 0.02
    gain = np.where(doms == "d5", -0.02 + wobble, 0.3 + rng.normal(0, 0.12, len(doms)))
    nll = np.stack([rate_a, rate_a - gain], 1) * chars[:, None] * LN2
    d5 = doms == "d5"
    assert gain[d5].mean() < 0  # d5 is worse when routed, by a little

    def fitter(experts, features, nll_, chars_, domains, support):
        return lambda f: np.stack([np.zeros(len(f)), -f[:, 0]], 1)

    loose = SafeTop1Config(alpha=0.025, support=1.0)
    strict = SafeTop1Config(support=1.0)
    tau_loose, seen_loose = fit_threshold(x, nll, chars, list(doms), 0, loose, fitter, EXPERTS)
    tau_strict, seen = fit_threshold(x, nll, chars, list(doms), 0, strict, fitter, EXPERTS)
    assert seen_loose["inner_delta_bpc"]["d5"] > 0  # the loose check let d5 get worse
    assert all(v <= 0 for v in seen["inner_delta_bpc"].values())  # the point rule did not
    assert tau_loose < tau_strict


def test_lodo_report_flags_every_subset_and_compares_the_variants(monkeypatch) -> None:
    """The report's table has a row per subset with both readings of 'captured' and the
    left-out domains made worse; the variants section runs each candidate rule."""
    d = data(signal=True, seed=7, n_dom=4, per=30)
    d3 = GateData(
        ("a", "b", "c"),
        d.features,
        np.concatenate([d.nll, d.nll[:, :1] + 5.0], 1),
        d.chars,
        d.categories,
    )
    monkeypatch.setattr(lodo, "SUBSETS", (("a", "b"), ("a", "b", "c")))
    monkeypatch.setattr(lodo, "MIN_ROWS", 10)
    lines, summary = lodo.lodo_report(d3, draws=100, gate_config=FAST)
    text = "\n".join(lines)
    assert "| a, b | 120 |" in text and "| a, b, c | 120 |" in text
    s = summary["a, b"]
    assert s["headroom"] > 0.05 and s["worse_domains"] == []
    assert s["captured_share_of_headroom"] == pytest.approx(s["captured"] / s["headroom"])
    assert set(summary["variants"]) == {name for name, _, _ in lodo.VARIANTS}
    assert "### How the served top-1 was chosen" in text
