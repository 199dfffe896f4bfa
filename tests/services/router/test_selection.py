import itertools
import math
import random

import pytest

from services.router.cost import Category
from services.router.profiles import CPU, JETSON_AGX_ORIN, RTX_4090, ExpertSpec
from services.router.selection import (
    BudgetClass,
    SelectionCache,
    SelectionProblem,
    budget_class,
    quantize_down,
    solve_brb,
    solve_brute_force,
    top_k,
)

CATS = ("prose", "code")


def random_instance(rng: random.Random, n: int, items: int = 20):
    """Per-expert costs, per-item probabilities q[n][i] and gate weights w[n]."""
    experts = tuple(f"e{i}" for i in range(n))
    energy = tuple(rng.uniform(0.1, 10.0) for _ in range(n))
    delays = tuple((c, tuple(rng.uniform(0.05, 2.0) for _ in range(n))) for c in CATS)
    problem = SelectionProblem(experts, energy, delays, t_agg_s=rng.choice((0.0, 0.05)))
    q = [[rng.uniform(0.01, 1.0) for _ in range(items)] for _ in range(n)]
    w = [rng.uniform(0.1, 1.0) for _ in range(n)]
    return problem, q, w


def monotone_mixture(q, w):
    """f(S) = mean_i log(sum_{n in S} w_n q_n(i)): non-decreasing under inclusion."""
    n, items = len(q), len(q[0])

    def f(mask: int) -> float:
        if mask == 0:
            return -math.inf
        total = 0.0
        for i in range(items):
            total += math.log(sum(w[k] * q[k][i] for k in range(n) if mask >> k & 1))
        return total / items

    return f


def monotone_max(q):
    """f(S) = mean_i log max_{n in S} q_n(i) (best expert per item): monotone, many plateaus."""
    n, items = len(q), len(q[0])

    def f(mask: int) -> float:
        if mask == 0:
            return -math.inf
        return sum(math.log(max(q[k][i] for k in range(n) if mask >> k & 1)) for i in range(items))

    return f


def random_budget(rng: random.Random, problem: SelectionProblem) -> BudgetClass:
    e = problem.energy_j
    energy = rng.choice((None, rng.uniform(0.5 * min(e), sum(e)), 0.5 * min(e)))
    delays = {}
    for c, d in problem.delay_s:
        r = rng.random()
        if r < 0.6:
            delays[c] = rng.uniform(min(d), max(d) + 0.1)
        elif r < 0.7:
            delays[c] = 0.5 * min(d)  # infeasible for every expert
    return BudgetClass.of(energy, delays)


@pytest.mark.parametrize("seed", range(12))
def test_brb_equals_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    infeasible = 0
    for trial in range(25):
        n = rng.randint(1, 12) if trial else 12
        problem, q, w = random_instance(rng, n)
        f = monotone_mixture(q, w) if trial % 3 else monotone_max(q)
        budget = random_budget(rng, problem)
        brb = solve_brb(problem, budget, f, on_masks=True)
        bf = solve_brute_force(problem, budget, f, on_masks=True)
        assert brb.feasible == bf.feasible
        if not bf.feasible:
            infeasible += 1
            assert brb.experts == frozenset() and brb.value == -math.inf and brb.reason
            continue
        assert brb.value == bf.value  # eps = 0: exact, same float
        mask = problem.mask_of(brb.experts)
        assert f(mask) == brb.value
        # the answer itself is feasible
        assert (
            budget.energy_j is None
            or sum(problem.energy_j[i] for i in range(n) if mask >> i & 1) <= budget.energy_j
        )
        if trial % 3:  # continuous objective: no ties, so the same subset
            assert brb.experts == bf.experts
        assert brb.stats.objective_evals <= 2**n
    assert infeasible < 25


def test_brb_prunes_compared_with_brute_force():
    rng = random.Random(7)
    problem, q, w = random_instance(rng, 12)
    f = monotone_mixture(q, w)
    budget = BudgetClass.of(0.4 * sum(problem.energy_j), {"prose": 1.8})
    brb = solve_brb(problem, budget, f, on_masks=True)
    bf = solve_brute_force(problem, budget, f, on_masks=True)
    assert brb.value == bf.value
    assert brb.stats.objective_evals < bf.stats.objective_evals


def test_frozenset_objective_and_eps():
    rng = random.Random(3)
    problem, q, w = random_instance(rng, 8)
    fm = monotone_mixture(q, w)

    def fs(ids: frozenset[str]) -> float:
        return fm(problem.mask_of(ids))

    budget = BudgetClass.of(0.3 * sum(problem.energy_j))
    exact = solve_brb(problem, budget, fs)
    assert exact.value == solve_brute_force(problem, budget, fs).value
    rough = solve_brb(problem, budget, fs, eps=0.05)
    assert rough.feasible and rough.value >= exact.value - 0.05
    with pytest.raises(ValueError):
        solve_brb(problem, budget, fs, eps=-1.0)


def test_infeasible_everywhere_names_the_violations():
    problem = SelectionProblem(("a", "b"), (2.0, 3.0), (("prose", (0.5, 0.2)),), t_agg_s=0.0)
    budget = BudgetClass.of(2.5, {"prose": 0.3})
    sel = solve_brb(problem, budget, lambda s: float(len(s)))
    assert not sel.feasible and sel.experts == frozenset()
    assert "a: prose delay 0.5 s > 0.3 s" in sel.reason
    assert "b: energy 3 J > 2.5 J" in sel.reason
    assert not solve_brute_force(problem, budget, lambda s: float(len(s))).feasible


def test_unknown_budget_category_is_an_error():
    problem = SelectionProblem(("a",), (1.0,), (("prose", (0.1,)),))
    with pytest.raises(ValueError, match="unknown category"):
        solve_brb(problem, BudgetClass.of(None, {"poetry": 1.0}), lambda s: 0.0)


def test_ties_are_deterministic():
    problem = SelectionProblem(tuple("abcd"), (1.0,) * 4, (("prose", (0.1,) * 4),))
    budget = BudgetClass.of(2.0)
    flat = [solve_brb(problem, budget, lambda s: 1.0) for _ in range(3)]
    assert len({s.experts for s in flat}) == 1 and flat[0].value == 1.0
    # a size-capped plateau: every pair is optimal; the answer is the same every time
    f = lambda s: float(min(len(s), 2))  # noqa: E731
    picks = {solve_brb(problem, budget, f).experts for _ in range(3)}
    assert len(picks) == 1 and len(next(iter(picks))) == 2


def test_latency_cut_branches_only_on_late_experts():
    # without reduce the root {a, b, c, d} breaks the delay budget through d alone; the cut
    # deletes only d, so the first child is already feasible
    problem = SelectionProblem(tuple("abcd"), (1.0,) * 4, (("code", (0.1, 0.1, 0.1, 5.0)),))
    budget = BudgetClass.of(None, {"code": 1.0})
    f = lambda s: float(len(s))  # noqa: E731
    cut = solve_brb(problem, budget, f, use_reduce=False)
    nocut = solve_brb(problem, budget, f, use_reduce=False, use_latency_cut=False)
    assert cut.experts == nocut.experts == frozenset("abc")
    assert cut.stats.nodes_pushed == 2  # root + {a, b, c}
    assert nocut.stats.nodes_pushed > cut.stats.nodes_pushed


@pytest.mark.parametrize("seed", range(6))
def test_latency_cut_and_reduce_switches_stay_exact(seed):
    rng = random.Random(100 + seed)
    for _ in range(10):
        problem, q, w = random_instance(rng, rng.randint(2, 9))
        f = monotone_mixture(q, w)
        budget = random_budget(rng, problem)
        ref = solve_brute_force(problem, budget, f, on_masks=True)
        for use_reduce, use_cut in itertools.product((True, False), repeat=2):
            got = solve_brb(
                problem,
                budget,
                f,
                on_masks=True,
                use_reduce=use_reduce,
                use_latency_cut=use_cut,
            )
            assert got.feasible == ref.feasible and got.value == ref.value


def test_non_monotone_objective_can_defeat_the_bound():
    """The guarantee assumes f is non-decreasing. With the gate renormalised over S and a fixed
    mixture (a weighted average, not the best gate for S), adding an expert can hurt; then the
    bound f(S) no longer covers S's subsets and branch-reduce-bound can miss the optimum. It
    is never better than brute force."""
    worse = 0
    rng = random.Random(11)
    for _ in range(200):
        problem, q, w = random_instance(rng, 6, items=5)

        def f(mask: int, q=q, w=w, n=6) -> float:
            if mask == 0:
                return -math.inf
            ws = sum(w[k] for k in range(n) if mask >> k & 1)
            return sum(
                math.log(sum(w[k] * q[k][i] for k in range(n) if mask >> k & 1) / ws)
                for i in range(len(q[0]))
            )

        budget = BudgetClass.of(0.6 * sum(problem.energy_j))
        brb = solve_brb(problem, budget, f, on_masks=True)
        bf = solve_brute_force(problem, budget, f, on_masks=True)
        assert brb.value <= bf.value
        worse += brb.value < bf.value
    assert worse > 0


def test_energy_override_expected_energy_model():
    problem = SelectionProblem(("a", "b", "c"), (1.0, 1.0, 1.0), (("prose", (0.1, 0.1, 0.1)),))

    def energy_of(ids: frozenset[str]) -> float:  # top-1 routing: half the requests each
        return 0.5 * len(ids)

    budget = BudgetClass.of(1.0)
    f = lambda s: float(len(s))  # noqa: E731
    assert len(solve_brb(problem, budget, f).experts) == 1  # additive: 1 J per expert
    assert len(solve_brb(problem, budget, f, energy_of=energy_of).experts) == 2
    assert solve_brute_force(problem, budget, f, energy_of=energy_of).value == 2.0


def test_problem_from_specs():
    specs = [
        ExpertSpec("small", JETSON_AGX_ORIN, 0.02, 0.002),
        ExpertSpec("big", RTX_4090, 0.2, 0.02),
        ExpertSpec("local", CPU, 0.01, 0.001),
    ]
    cats = {Category("prose", 64, 64): 1.0, Category("code", 128, 128): 1.0}
    problem = SelectionProblem.from_specs(specs, cats, t_agg_s=0.01)
    assert problem.experts == ("small", "big", "local")
    assert [c for c, _ in problem.delay_s] == ["prose", "code"]
    assert all(e > 0 for e in problem.energy_j)
    sel = solve_brb(problem, BudgetClass.of(50.0, {"prose": 2.0}), lambda s: float(len(s)))
    assert sel.feasible


def test_selection_cache_hits_and_invalidates_on_version_bump():
    cache = SelectionCache(maxsize=2)
    problem = SelectionProblem(("a", "b"), (1.0, 2.0), (("prose", (0.1, 0.2)),))
    calls = []

    def solver(budget):
        def run():
            calls.append(budget)
            return solve_brb(problem, budget, lambda s: float(len(s)))

        return run

    b1, b2, b3 = BudgetClass.of(1.0), BudgetClass.of(3.0), BudgetClass.of(None, {"prose": 1.0})
    first = cache.get_or_solve(b1, 1, solver(b1))
    assert cache.get_or_solve(BudgetClass.of(1.0), 1, solver(b1)) is first
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)
    cache.get_or_solve(b2, 1, solver(b2))
    assert cache.get_or_solve(b2, 1, solver(b2)).experts == frozenset("ab")
    assert (cache.hits, cache.misses) == (2, 2)
    # profiles changed: version 2 re-solves and drops version-1 entries
    cache.get_or_solve(b1, 2, solver(b1))
    assert cache.version == 2 and len(cache) == 1 and cache.misses == 3
    # LRU bound
    cache.get_or_solve(b2, 2, solver(b2))
    cache.get_or_solve(b3, 2, solver(b3))
    assert len(cache) == 2
    cache.get_or_solve(b1, 2, solver(b1))  # evicted -> miss
    assert cache.misses == 6
    cache.invalidate()
    assert len(cache) == 0


def test_budget_classes_round_down():
    assert quantize_down(None, (1.0, 2.0)) is None
    assert quantize_down(1.7, (1.0, 2.0)) == 1.0
    assert quantize_down(0.3, (1.0, 2.0)) == 0.3
    a = budget_class(7.5, {"prose": 1.3}, (1.0, 5.0, 10.0), (0.5, 1.0, 2.0))
    b = budget_class(9.9, {"prose": 1.9}, (1.0, 5.0, 10.0), (0.5, 1.0, 2.0))
    assert a == b == BudgetClass.of(5.0, {"prose": 1.0})
    assert hash(a) == hash(b)


def test_top_k_restricts_and_renormalises():
    scores = {"a": 2.0, "b": 1.0, "c": 0.0, "d": 5.0}
    full = top_k(scores, ["a", "b", "c"], k=3)
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.0))
    assert [e for e, _ in full] == ["a", "b", "c"]  # d is outside S
    assert [w for _, w in full] == pytest.approx([math.exp(2) / z, math.exp(1) / z, 1 / z])
    two = top_k(scores, ["a", "b", "c"], k=2)
    assert [e for e, _ in two] == ["a", "b"]
    assert [w for _, w in two] == pytest.approx([math.exp(1) / (math.exp(1) + 1), 1 / (math.e + 1)])
    assert sum(w for _, w in two) == pytest.approx(1.0)
    assert top_k(scores, ["c"], k=4) == (("c", 1.0),)
    tie = top_k({"x": 1.0, "y": 1.0, "z": 1.0}, "zyx", k=2)
    assert tie == (("x", 0.5), ("y", 0.5))
    assert top_k({"x": -math.inf, "y": -math.inf}, "xy", 2) == (("x", 0.5), ("y", 0.5))
    big = top_k({"x": 1000.0, "y": 999.0}, "xy", 2)  # no overflow
    assert big[0][1] == pytest.approx(1 / (1 + math.exp(-1)))
    with pytest.raises(ValueError):
        top_k(scores, [], 1)
    with pytest.raises(ValueError):
        top_k(scores, ["a"], 0)
    with pytest.raises(KeyError):
        top_k(scores, ["zz"], 1)
