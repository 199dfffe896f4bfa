"""MoE²'s coarse level on the trained gate: choose the expert subset S that minimises the
gated mixture's validation loss L(S, theta*|S) (the gate trained once on all experts,
renormalised over S) under the energy budget and the per-category delay budgets.

The exact branch-reduce-bound solver needs an objective that never decreases as S grows.
-L(S, theta*|S) is only nearly monotone (docs/bench/gate.md: some S ⊂ S' pairs get worse by
up to 0.013 bits/char), so the solver runs on its monotone hull

    f_hat(S) = max_{T ⊆ S} -L(T, theta*|T)

which is non-decreasing by construction. Because the feasible sets are down-closed (a
subset of a feasible set is feasible: energy and delay only grow with S), the best feasible
f_hat equals the best feasible -L, and the subset T that attains it is the answer. The hull
costs up to 2^|S| loss evaluations per node (memoised), fine for the handful of experts a
router has; without it, set `hull=False` and accept the near-monotone objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from services.router.gate import Gate, mixture_loss
from services.router.gate_data import GateData
from services.router.selection import BudgetClass, Selection, SelectionProblem, solve_brb


class MonotoneHull:
    """f_hat(S) = max over T ⊆ S of f(T), with the maximising T (memoised)."""

    def __init__(self, f: Callable[[frozenset[str]], float]) -> None:
        self._f = f
        self._memo: dict[frozenset[str], tuple[float, frozenset[str]]] = {}

    def __call__(self, subset: frozenset[str]) -> float:
        return self.argmax(subset)[0]

    def argmax(self, subset: frozenset[str]) -> tuple[float, frozenset[str]]:
        hit = self._memo.get(subset)
        if hit is not None:
            return hit
        best = (self._f(subset), subset)
        if len(subset) > 1:
            for e in sorted(subset):
                value, t = self.argmax(subset - {e})
                if value > best[0]:
                    best = (value, t)
        self._memo[subset] = best
        return best


def gate_objective(
    gate: Gate, val: GateData, top_k: int | None = None
) -> Callable[[frozenset[str]], float]:
    """-L(S, theta*|S) in bits/char on `val` (memoised per subset)."""
    memo: dict[frozenset[str], float] = {}

    def f(subset: frozenset[str]) -> float:
        if subset not in memo:
            memo[subset] = -mixture_loss(gate, val, sorted(subset), top_k)
        return memo[subset]

    return f


def plan(
    problem: SelectionProblem,
    budget: BudgetClass,
    gate: Gate,
    val: GateData,
    top_k: int | None = None,
    hull: bool = True,
) -> Selection:
    """The budget-feasible subset with the lowest validation loss (value = -bits/char)."""
    f = gate_objective(gate, val, top_k)
    if not hull:
        return solve_brb(problem, budget, f)
    f_hat = MonotoneHull(f)
    selection = solve_brb(problem, budget, f_hat)
    if not selection.feasible:
        return selection
    value, best = f_hat.argmax(selection.experts)
    return replace(selection, experts=best, value=value)
