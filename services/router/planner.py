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

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

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
    """-L(S, theta*|S) in bits/char on `val` (memoised per subset); with top_k 1 the loss of
    the served top-1 pick (`gate.served_log_weights`: the safe router's where the gate has
    one), so the coarse level plans for what the fine level serves."""
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
    energy_of: Callable[[frozenset[str]], float] | None = None,
) -> Selection:
    """The budget-feasible subset with the lowest validation loss (value = -bits/char)."""
    return plan_objective(
        problem, budget, gate_objective(gate, val, top_k), hull=hull, energy_of=energy_of
    )


def plan_objective(
    problem: SelectionProblem,
    budget: BudgetClass,
    f: Callable[[frozenset[str]], float],
    *,
    hull: bool = True,
    energy_of: Callable[[frozenset[str]], float] | None = None,
) -> Selection:
    """`plan` on any (nearly monotone) objective, e.g. a `SubsetLossTable`'s."""
    if not hull:
        return solve_brb(problem, budget, f, energy_of=energy_of)
    f_hat = MonotoneHull(f)
    selection = solve_brb(problem, budget, f_hat, energy_of=energy_of)
    if not selection.feasible:
        return selection
    value, best = f_hat.argmax(selection.experts)
    return replace(selection, experts=best, value=value)


@dataclass(frozen=True)
class SubsetLossTable:
    """The gate's validation loss L(S, theta*|S) (bits/char) for every non-empty subset S of
    its experts and every fine-level k, computed once when the gate is trained and shipped next
    to it (`artifacts/gate/subset_loss.json`), so the router needs no gate data at run time.
    k = 1 is the loss of the served top-1 pick (the gate's safe router where it has one for
    S, as `Moe2Selector.rank` serves it), not of the softmax's argmax."""

    experts: tuple[str, ...]
    losses: Mapping[int, Mapping[frozenset[str], float]]  # k -> S -> bits/char

    @classmethod
    def compute(cls, gate: Gate, val: GateData) -> SubsetLossTable:
        n = len(gate.experts)
        losses: dict[int, dict[frozenset[str], float]] = {}
        for k in range(1, n + 1):
            f = gate_objective(gate, val, None if k == n else k)
            losses[k] = {
                frozenset(s): -f(frozenset(s))
                for r in range(1, n + 1)
                for s in itertools.combinations(gate.experts, r)
            }
        return cls(tuple(gate.experts), losses)

    def loss(self, subset: frozenset[str], k: int) -> float:
        """L(S) with top-k inside S (k >= |S| is the full mixture over S)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        return self.losses[min(k, len(self.experts))][subset]

    def objective(self, k: int) -> Callable[[frozenset[str]], float]:
        """-L(S) for the solver (maximised)."""
        return lambda subset: -self.loss(subset, k)

    def to_json(self) -> dict:
        return {
            "experts": list(self.experts),
            "losses": {
                str(k): [
                    [sorted(s), v] for s, v in sorted(table.items(), key=lambda t: sorted(t[0]))
                ]
                for k, table in self.losses.items()
            },
        }

    @classmethod
    def from_json(cls, blob: Mapping) -> SubsetLossTable:
        experts = tuple(blob["experts"])
        losses = {
            int(k): {frozenset(s): float(v) for s, v in rows} for k, rows in blob["losses"].items()
        }
        expected = (1 << len(experts)) - 1
        for k, table in losses.items():
            if len(table) != expected or not all(s <= set(experts) for s in table):
                raise ValueError(f"subset loss table k={k}: needs every non-empty subset")
        if sorted(losses) != list(range(1, len(experts) + 1)):
            raise ValueError("subset loss table: needs k = 1..N")
        return cls(experts, losses)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> SubsetLossTable:
        return cls.from_json(json.loads(path.read_text()))
