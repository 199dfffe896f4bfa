"""MoE² for one request: the coarse subset S (cached per budget class) and the gate's top-k in S.

Coarse level (`Moe2Selector.coarse`): over the healthy experts the gate knows, maximise minus
the gate's validation loss (`SubsetLossTable`, on its monotone hull) subject to

- energy: the worst case of one request, the k most expensive experts of S
  (`selection.top_k_energy`), <= the energy budget;
- delay: every expert of S, predicted for the request's shape class (telemetry-corrected),
  <= the latency budget (the k chosen experts run in parallel, so the request's delay is the
  slowest of them).

Both are worst cases over S, so whichever k experts the fine level picks, the request is
predicted to meet its budgets. Budgets are rounded DOWN and request shapes UP to a small grid
of classes (`budget_key`), so one solve serves every request of a class: the result is cached
until the healthy set changes or the latency telemetry drifts (`version`).

Infeasible (no single expert fits): `BudgetInfeasible` (a 400), unless the client asked for
best effort; then the single expert that overshoots its budgets least (relative) serves.

Fine level (`Moe2Selector.rank`): softmax of the gate's logits on the prompt's features,
restricted to S, largest first. The caller runs the first k (`selection.top_k`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.router.budget import ENERGY_FIELD, LATENCY_FIELD, RequestBudget
from services.router.gate import Gate
from services.router.planner import SubsetLossTable, plan_objective
from services.router.predictor import Predictor, Shape
from services.router.selection import (
    BudgetClass,
    Selection,
    SelectionCache,
    SelectionProblem,
    quantize_down,
    top_k,
    top_k_energy,
)

# Budget classes: a geometric grid with 4 steps per doubling (each class <= 19% below the
# client's budget), from 1 mJ / 1 ms up.
GRID = tuple(1e-3 * 2 ** (i / 4) for i in range(4 * 40))
DELAY_CATEGORY = "request"


class BudgetInfeasible(ValueError):
    """No healthy expert is predicted to meet the request's budgets (a 400 for the client)."""

    code = "budget_infeasible"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Coarse:
    """The coarse level's answer for one request."""

    subset: tuple[str, ...]  # S, by the gate's expert order
    budget_met: bool
    value: float  # -validation bits/char of S (nan for best effort)
    # Healthy experts outside S that meet the budgets on their own, best single loss first:
    # where a request goes when every member of S has failed.
    fallbacks: tuple[str, ...] = ()


def budget_key(budget: RequestBudget, shape: Shape) -> tuple[Shape, int, BudgetClass]:
    """The cache key of a request: its shape class, k, and its budgets rounded down."""
    delay = {} if budget.latency_s is None else {DELAY_CATEGORY: budget.latency_s}
    cls = BudgetClass.of(
        quantize_down(budget.energy_j, GRID),
        {c: quantize_down(v, GRID) for c, v in delay.items()},  # type: ignore[misc]
    )
    return shape.rounded_up(), budget.top_k, cls


class Moe2Selector:
    def __init__(
        self,
        gate: Gate,
        losses: SubsetLossTable,
        predictor: Predictor,
        healthy: Callable[[], Iterable[str]],
        *,
        cache_size: int = 256,
    ) -> None:
        if tuple(losses.experts) != tuple(gate.experts):
            raise ValueError(
                f"the subset losses are for {losses.experts}, the gate for {gate.experts}"
            )
        self.gate = gate
        self.losses = losses
        self.predictor = predictor
        self.healthy = healthy
        self.experts = tuple(e for e in gate.experts if e in predictor.specs)
        if not self.experts:
            raise ValueError(
                f"no configured expert is known to the gate (gate experts: {gate.experts})"
            )
        self.cache_size = cache_size
        self.caches: dict[tuple[Shape, int], SelectionCache] = {}  # per shape class and k
        self.solves = 0

    @property
    def cache_hits(self) -> int:
        return sum(c.hits for c in self.caches.values())

    def available(self) -> tuple[str, ...]:
        up = set(self.healthy())
        return tuple(e for e in self.experts if e in up)

    def coarse(self, budget: RequestBudget, shape: Shape) -> Coarse:
        experts = self.available()
        if not experts:
            return Coarse((), False, math.nan)
        shape_cls, k, budget_cls = budget_key(budget, shape)
        version = hash((self.predictor.telemetry.version, experts))
        cache = self.caches.setdefault((shape_cls, k), SelectionCache(self.cache_size))
        selection = cache.get_or_solve(
            budget_cls, version, lambda: self._solve(experts, shape_cls, k, budget_cls)
        )
        if selection.feasible:
            ordered = tuple(e for e in experts if e in selection.experts)
            spare = [e for e in experts if e not in ordered and self._fits(e, shape_cls, budget)]
            spare.sort(key=lambda e: (self.losses.loss(frozenset({e}), 1), e))
            return Coarse(ordered, True, selection.value, tuple(spare))
        if not budget.best_effort:
            raise self._infeasible(experts, shape, budget)
        return Coarse((self._least_over(experts, shape, budget),), False, math.nan)

    def rank(self, features: np.ndarray, subset: Sequence[str]) -> tuple[tuple[str, float], ...]:
        """The gate's weights inside S, largest first (sum 1). The first expert is the served
        top-1 pick (`Gate.top1`: the safe router's where the gate has one): when it is not
        the softmax's argmax it swaps places and weights with it, so the order and the
        weights stay consistent."""
        if len(subset) == 1:
            return ((subset[0], 1.0),)
        logits = self.gate.scores(features)
        scores = {e: float(z) for e, z in zip(self.gate.experts, logits, strict=True)}
        ranked = list(top_k(scores, subset, len(subset)))
        first = self.gate.top1(features, subset)
        i = next(j for j, (e, _) in enumerate(ranked) if e == first)
        if i:
            (a, wa), (b, wb) = ranked[0], ranked[i]
            ranked[0], ranked[i] = (b, wa), (a, wb)
        return tuple(ranked)

    # -- internals ---------------------------------------------------------------------

    def _solve(
        self, experts: tuple[str, ...], shape: Shape, k: int, budget: BudgetClass
    ) -> Selection:
        self.solves += 1
        p = self.predictor
        problem = SelectionProblem(
            experts,
            tuple(p.energy_j(e, shape) for e in experts),
            ((DELAY_CATEGORY, tuple(p.predicted_s(e, shape) for e in experts)),),
        )
        return plan_objective(
            problem, budget, self.losses.objective(k), energy_of=top_k_energy(problem, k)
        )

    def _fits(self, expert: str, shape: Shape, budget: RequestBudget) -> bool:
        return self._overshoot(expert, shape, budget) <= 1.0

    def _overshoot(self, expert: str, shape: Shape, budget: RequestBudget) -> float:
        ratios = [0.0]
        if budget.latency_s is not None:
            ratios.append(self.predictor.predicted_s(expert, shape) / budget.latency_s)
        if budget.energy_j is not None:
            ratios.append(self.predictor.energy_j(expert, shape) / budget.energy_j)
        return max(ratios)

    def _least_over(self, experts: Sequence[str], shape: Shape, budget: RequestBudget) -> str:
        return min(experts, key=lambda e: (self._overshoot(e, shape, budget), e))

    def _infeasible(
        self, experts: Sequence[str], shape: Shape, budget: RequestBudget
    ) -> BudgetInfeasible:
        fastest = min(experts, key=lambda e: self.predictor.predicted_s(e, shape))
        cheapest = min(experts, key=lambda e: self.predictor.energy_j(e, shape))
        t = self.predictor.predicted_s(fastest, shape) * 1000
        j = self.predictor.energy_j(cheapest, shape)
        late = budget.latency_ms is not None and t > budget.latency_ms
        param = LATENCY_FIELD if late else ENERGY_FIELD
        return BudgetInfeasible(
            f"No healthy expert is predicted to meet this request's budgets "
            f"(latency_ms={budget.latency_ms}, energy_j={budget.energy_j}) for "
            f"{shape.output_tokens} output tokens: the fastest ({fastest}) needs ~{t:.0f} ms, "
            f"the cheapest ({cheapest}) ~{j:.3g} J (modelled). Raise the budget, lower "
            f"max_tokens, or send best_effort=true.",
            param,
        )
