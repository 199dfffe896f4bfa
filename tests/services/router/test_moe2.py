"""MoE² per request: the coarse level under budgets equals brute force, infeasible budgets are
explained (or served best-effort), selections are cached per budget class and re-solved when
health or telemetry change, and the fine level ranks by the gate."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from services.router.budget import RequestBudget
from services.router.moe2 import BudgetInfeasible, Moe2Selector
from services.router.planner import MonotoneHull
from services.router.predictor import Shape
from tests.services.router.moe2_fixtures import ClusterFeaturizer, selector
from tests.services.router.test_gate import EXPERTS

SHAPE = Shape(prompt_tokens=20, output_tokens=50)


def budget(latency_ms=None, energy_j=None, best_effort=False, top_k=1) -> RequestBudget:
    return RequestBudget(latency_ms, energy_j, best_effort, top_k)


def brute(sel: Moe2Selector, b: RequestBudget, shape: Shape) -> float:
    """Best hull value over every subset whose worst-case top-k energy and max delay fit the
    class the selector solves for (budgets rounded down, shape rounded up)."""
    from services.router.moe2 import GRID
    from services.router.selection import quantize_down

    cls_shape = shape.rounded_up()
    p = sel.predictor
    e_max = quantize_down(b.energy_j, GRID)
    t_max = quantize_down(b.latency_s, GRID)
    hull = MonotoneHull(sel.losses.objective(b.top_k))
    best = -math.inf
    for r in range(1, len(EXPERTS) + 1):
        for s in itertools.combinations(EXPERTS, r):
            energies = sorted((p.energy_j(e, cls_shape) for e in s), reverse=True)
            if e_max is not None and sum(energies[: b.top_k]) > e_max:
                continue
            if t_max is not None and max(p.predicted_s(e, cls_shape) for e in s) > t_max:
                continue
            best = max(best, hull(frozenset(s)))
    return best


def test_coarse_level_equals_brute_force_over_a_budget_grid() -> None:
    sel = selector()
    energies = [p * 10 for p in (0.05, 0.2, 0.5, 1, 2, 5, 20, 100)]
    latencies = [None, 200, 600, 1500, 5000]
    checked = 0
    for e, t, k in itertools.product(energies, latencies, (1, 2, 3)):
        b = budget(t, e, top_k=k)
        want = brute(sel, b, SHAPE)
        if want == -math.inf:
            with pytest.raises(BudgetInfeasible):
                sel.coarse(b, SHAPE)
            continue
        got = sel.coarse(b, SHAPE)
        assert got.budget_met
        assert got.value == pytest.approx(want), (e, t, k, got)
        checked += 1
    assert checked > 40


def test_tight_latency_drops_the_slow_expert_and_energy_drops_the_hungry_one() -> None:
    sel = selector()
    p = sel.predictor
    shape_cls = SHAPE.rounded_up()
    slow = max(sel.experts, key=lambda e: p.predicted_s(e, shape_cls))
    hungry = max(sel.experts, key=lambda e: p.energy_j(e, shape_cls))
    assert slow == "prose_pro" and hungry == "code_pro"
    t_slow = p.predicted_s(slow, shape_cls) * 1000
    assert slow not in sel.coarse(budget(latency_ms=t_slow * 0.9), SHAPE).subset
    e_hungry = p.energy_j(hungry, shape_cls)
    assert hungry not in sel.coarse(budget(energy_j=e_hungry * 0.9), SHAPE).subset


def test_infeasible_is_explained_and_best_effort_serves_the_least_over() -> None:
    sel = selector()
    with pytest.raises(BudgetInfeasible) as exc:
        sel.coarse(budget(latency_ms=1), SHAPE)
    assert exc.value.param == "latency_ms" and "best_effort" in str(exc.value)
    with pytest.raises(BudgetInfeasible) as exc:
        sel.coarse(budget(energy_j=1e-6), SHAPE)
    assert exc.value.param == "energy_j"
    got = sel.coarse(budget(latency_ms=1, best_effort=True), SHAPE)
    fastest = min(sel.experts, key=lambda e: sel.predictor.predicted_s(e, SHAPE))
    assert got.subset == (fastest,) and not got.budget_met


def test_cached_per_budget_class_and_resolved_on_health_or_telemetry_change() -> None:
    up = set(EXPERTS)
    sel = selector()
    sel.healthy = lambda: up
    first = sel.coarse(budget(latency_ms=5000), SHAPE)
    # Same class: a budget 5% lower and a slightly shorter request share the cached solve.
    again = sel.coarse(budget(latency_ms=4900), Shape(18, 40))
    assert sel.solves == 1 and again == first and sel.cache_hits == 1
    # An expert goes down: re-solved without it.
    member = first.subset[0]
    up.discard(member)
    assert member not in sel.coarse(budget(latency_ms=5000), SHAPE).subset
    assert sel.solves == 2
    # Telemetry says an expert is 10x slower than modelled: re-solved, and it no longer fits.
    up.add(member)
    p = sel.predictor
    slow = "meh"
    t = p.predicted_s(slow, SHAPE.rounded_up())
    for _ in range(20):
        p.observe(slow, SHAPE, p.modelled_s(slow, SHAPE) * 10)
    assert p.telemetry.correction(slow) > 5
    got = sel.coarse(budget(latency_ms=t * 1000 * 2), SHAPE)
    assert sel.solves == 3 and slow not in got.subset


def test_no_healthy_expert_gives_an_empty_subset() -> None:
    assert selector(healthy=()).coarse(budget(), SHAPE).subset == ()


def test_fine_level_ranks_by_the_gate() -> None:
    sel = selector()
    feat = ClusterFeaturizer()
    prose = asyncio.run(feat.features("a story about the sea"))
    code = asyncio.run(feat.features("python code: def f(x)"))
    assert sel.rank(prose, EXPERTS)[0][0] == "prose_pro"
    assert sel.rank(code, EXPERTS)[0][0] == "code_pro"
    ranked = sel.rank(code, ("prose_pro", "meh"))
    assert [e for e, _ in ranked] == ["meh", "prose_pro"]  # code: meh (40) beats prose_pro (60)
    assert sum(w for _, w in ranked) == pytest.approx(1.0)
