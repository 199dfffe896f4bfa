"""The coarse level on a trained gate: plan() equals brute force over the raw (not
necessarily monotone) objective on every budget, thanks to the monotone hull."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from services.router.gate import train_gate
from services.router.planner import MonotoneHull, SubsetLossTable, gate_objective, plan
from services.router.safe_top1 import SafeTop1
from services.router.selection import BudgetClass, SelectionProblem
from tests.services.router.test_gate import EXPERTS, synthetic


def _brute(problem: SelectionProblem, budget: BudgetClass, f) -> float:
    best = float("-inf")
    for r in range(1, len(problem.experts) + 1):
        for subset in itertools.combinations(range(len(problem.experts)), r):
            energy = sum(problem.energy_j[i] for i in subset)
            if budget.energy_j is not None and energy > budget.energy_j:
                continue
            if any(
                max(d[i] for i in subset) + problem.t_agg_s > (budget.delay_for(c) or 1e9)
                for c, d in problem.delay_s
            ):
                continue
            best = max(best, f(frozenset(problem.experts[i] for i in subset)))
    return best


def test_hull_is_monotone_and_keeps_the_maximiser():
    values = {"a": 1.0, "b": 3.0, "c": 2.0}
    f = lambda s: sum(values[e] for e in s) - 4.0 * (len(s) > 1)  # noqa: E731
    hull = MonotoneHull(f)
    for small, big in [({"a"}, {"a", "b"}), ({"b"}, {"a", "b", "c"}), ({"c"}, {"b", "c"})]:
        assert hull(frozenset(small)) <= hull(frozenset(big))
    assert hull.argmax(frozenset({"a", "b", "c"})) == (3.0, frozenset({"b"}))


@pytest.mark.parametrize("top_k", [None, 1])
def test_plan_equals_brute_force_on_every_budget(top_k):
    train, val = synthetic(seed=0), synthetic(n=60, seed=1)
    gate = train_gate(train, val=val)
    problem = SelectionProblem(
        experts=EXPERTS,
        energy_j=(5.0, 3.0, 1.0),
        delay_s=(("fortunes", (0.4, 0.2, 0.1)), ("stdlib", (0.5, 0.3, 0.1))),
    )
    f = gate_objective(gate, val, top_k)
    for energy in (0.5, 1.0, 3.5, 4.0, 6.0, 9.0):
        for delay in (0.05, 0.25, 0.45, 1.0):
            budget = BudgetClass.of(energy, {"fortunes": delay, "stdlib": delay})
            got = plan(problem, budget, gate, val, top_k)
            want = _brute(problem, budget, f)
            if want == float("-inf"):
                assert not got.feasible
                continue
            assert got.feasible and got.value == pytest.approx(want)
            assert f(got.experts) == pytest.approx(want)  # the subset itself attains it


def test_subset_loss_table_top1_is_the_served_safe_pick():
    """k = 1 in the table the coarse level plans with is the loss of what the fine level
    serves (`Gate.top1`, the safe router's pick), not the softmax's argmax."""
    train, val = synthetic(seed=0), synthetic(n=60, seed=1)
    gate = train_gate(train, val=val)
    pair = ("prose_pro", "code_pro")
    softmax = SubsetLossTable.compute(gate, val).loss(frozenset(pair), 1)
    # A safe router that always abstains to prose_pro on this pair: the served top-1 is
    # prose_pro alone, which the trained gate's argmax (code prompts to code_pro) beats.
    safe = SafeTop1(EXPERTS, None)
    for s in itertools.chain(itertools.combinations(EXPERTS, 2), [EXPERTS]):
        safe.priors[s], safe.taus[s] = s[0], math.inf
    gate.safe = safe
    table = SubsetLossTable.compute(gate, val)
    served = np.array([EXPERTS.index(gate.top1(f, pair)) for f in val.features])
    want = val.nll[np.arange(len(val)), served].sum() / val.chars.sum() / math.log(2)
    assert set(served.tolist()) == {0}
    assert table.loss(frozenset(pair), 1) == pytest.approx(want)
    assert table.loss(frozenset(pair), 1) > softmax + 0.1
    # k = 2 on the pair is the mixture, untouched by the safe router.
    gate.safe = None
    assert table.loss(frozenset(pair), 2) == SubsetLossTable.compute(gate, val).loss(
        frozenset(pair), 2
    )
