"""SafeTop1 (top-1 routing that abstains to the prior) and the leave-one-domain-out
evaluation, on synthetic gate data where the answer is known."""

from __future__ import annotations

import math

import numpy as np

from services.router.gate import GateConfig
from services.router.gate_data import GateData
from services.router.gate_lodo import bootstrap_delta, evaluate_subset, restrict
from services.router.safe_top1 import SafeTop1, SafeTop1Config, route

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
    back = SafeTop1.from_state(safe.to_state())
    assert back.choose(d.features, EXPERTS) == safe.choose(d.features, EXPERTS)
    assert len(restrict(GateData(EXPERTS, d.features, nll, d.chars, d.categories), EXPERTS)) == (
        len(d) - len(range(0, len(d), 3))
    )


def test_gate_mode_routes_a_real_signal_by_the_gates_margin() -> None:
    d = data(signal=True, seed=4)
    safe = SafeTop1.fit(
        EXPERTS, d.features, d.nll, d.chars, d.categories, [EXPERTS], gate_config=FAST
    )
    assert safe.mode == "gate" and math.isfinite(safe.taus[EXPERTS])
    logits = np.stack([np.zeros(len(d)), np.where(d.features[:, 0] > 0, 5.0, -5.0)], 1)
    picks = safe.choose(d.features, EXPERTS, logits)
    assert picks == ["b" if x > 0 else "a" for x in d.features[:, 0]]
    back = SafeTop1.from_state(safe.to_state())
    assert back.mode == "gate" and back.choose(d.features, EXPERTS, logits) == picks


def test_bootstrap_delta_is_zero_for_identical_methods() -> None:
    res = evaluate_subset(data(signal=False, seed=3, n_dom=3, per=40), EXPERTS, FAST)
    assert bootstrap_delta(res, "prior", draws=100) == (0.0, 0.0, 0.0)
    assert SafeTop1Config().min_inner_domains >= 2
