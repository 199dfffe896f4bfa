"""Two-level expert selection (MoE² §1.2-1.3): the coarse subset S, then top-k inside S.

Coarse level: maximise a monotone objective f(S) (in the router: minus the gated mixture's
validation loss with the gate trained once on all experts, restricted to S) subject to an
energy budget `E(S) <= E_max` and per-category delay budgets `T_c(S) <= T_c,max`, with the
exact discrete monotonic optimization (branch-reduce-bound over the subset lattice):

- reduce: drop every expert that is infeasible on its own;
- incumbent: the best feasible single expert;
- a max-heap of nodes keyed by their upper bound f(S) (valid for every subset of S because f is
  non-decreasing); stop when the best bound is <= incumbent + eps;
- a feasible node becomes the incumbent (no subset of it can beat it); an infeasible one
  branches by deleting one expert; when it violates a delay budget only the experts that alone
  exceed that budget are deleted (for a max-type constraint the others cannot fix it);
- a `seen` set so every subset is evaluated at most once.

With eps = 0 the returned value equals brute force's whenever f is non-decreasing under
inclusion and E, T_c are too (`E` additive here, or any monotone `energy_of`). For a
non-monotone f the bound is invalid and the result can be suboptimal. Among subsets with equal
value the choice is deterministic (heap order: higher f, then larger set, then smaller bitmask)
but may differ from brute force's tie-break; the value does not.

Energy is modelled (power x time), not measured; see `services.router.cost`.

Fine level: `top_k` takes the gate's logits, restricts the softmax to S, keeps the k largest
and renormalises their weights.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from services.router.cost import Category, expert_cost, mean_energy
from services.router.profiles import ExpertSpec

Objective = Callable[[frozenset[str]], float]
MaskObjective = Callable[[int], float]


@dataclass(frozen=True)
class BudgetClass:
    """Budgets one cached selection serves: energy per request (J, modelled; None = no limit)
    and delay per category (s). Hashable; build it with `BudgetClass.of`."""

    energy_j: float | None = None
    delay_s: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, energy_j: float | None = None, delay_s: Mapping[str, float] | None = None):
        return cls(energy_j, tuple(sorted((delay_s or {}).items())))

    def delay_for(self, category: str) -> float | None:
        for name, limit in self.delay_s:
            if name == category:
                return limit
        return None


def quantize_down(value: float | None, levels: Sequence[float]) -> float | None:
    """The largest level <= value (conservative: the class never exceeds the client's budget).
    None stays None (no limit). A value below every level returns the value itself, so a tiny
    budget stays tiny rather than being loosened."""
    if value is None:
        return None
    below = [lv for lv in levels if lv <= value]
    return max(below) if below else value


def budget_class(
    energy_j: float | None,
    delay_s: Mapping[str, float],
    energy_levels: Sequence[float],
    delay_levels: Sequence[float],
) -> BudgetClass:
    """Map a request's budgets onto a small set of classes (rounded down) so that requests in
    the same class share one cached coarse selection."""
    delays = {c: quantize_down(v, delay_levels) for c, v in delay_s.items()}
    return BudgetClass.of(quantize_down(energy_j, energy_levels), delays)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SelectionProblem:
    """Per-expert costs the coarse level needs, in a fixed expert order (bit i = experts[i]).

    - `energy_j[i]`: expert i's energy per request (additive over S).
    - `delay_s`: per category, each expert's compute + transmit time (without t_agg).
    - `t_agg_s`: aggregation time added to the subset's max delay.
    """

    experts: tuple[str, ...]
    energy_j: tuple[float, ...]
    delay_s: tuple[tuple[str, tuple[float, ...]], ...]
    t_agg_s: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.experts)
        if len(set(self.experts)) != n:
            raise ValueError("expert ids must be unique")
        if len(self.energy_j) != n or any(len(d) != n for _, d in self.delay_s):
            raise ValueError("every per-expert cost needs one entry per expert")

    @classmethod
    def from_specs(
        cls, specs: Sequence[ExpertSpec], categories: Mapping[Category, float], t_agg_s: float
    ) -> SelectionProblem:
        """Costs from profiles: energy averaged over the category mix (weights), delays per
        category."""
        energy = mean_energy(specs, categories)
        delays = tuple(
            (c.name, tuple(expert_cost(s, c).delay_s for s in specs)) for c in categories
        )
        return cls(
            tuple(s.expert_id for s in specs),
            tuple(energy[s.expert_id] for s in specs),
            delays,
            t_agg_s,
        )

    def mask_of(self, ids: Iterable[str]) -> int:
        index = {e: i for i, e in enumerate(self.experts)}
        mask = 0
        for e in ids:
            mask |= 1 << index[e]
        return mask

    def ids_of(self, mask: int) -> frozenset[str]:
        return frozenset(e for i, e in enumerate(self.experts) if mask >> i & 1)


@dataclass(frozen=True)
class SolverStats:
    nodes_expanded: int = 0
    objective_evals: int = 0
    nodes_pushed: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Selection:
    """The coarse level's answer. When `feasible` is False no non-empty subset meets the
    budgets: `experts` is empty, `value` is -inf and `reason` says what each expert violates
    (the router turns this into a 4xx unless the client asked for best effort)."""

    experts: frozenset[str]
    value: float
    feasible: bool
    reason: str = ""
    stats: SolverStats = field(default_factory=SolverStats)


class _Instance:
    """Bitmask view of a problem + budget: feasibility tests and the objective memo."""

    def __init__(
        self,
        problem: SelectionProblem,
        budget: BudgetClass,
        objective: MaskObjective,
        energy_of: Callable[[int], float] | None,
    ) -> None:
        self.problem = problem
        self.n = len(problem.experts)
        self.e_max = budget.energy_j
        names = {c for c, _ in problem.delay_s}
        for c, _ in budget.delay_s:
            if c not in names:
                raise ValueError(f"budget names unknown category {c!r}")
        self.limits = [
            (c, d, budget.delay_for(c))
            for c, d in problem.delay_s
            if budget.delay_for(c) is not None
        ]
        self.t_agg = problem.t_agg_s
        self._objective = objective
        self._energy_of = energy_of
        self.memo: dict[int, float] = {}
        # experts that alone exceed category c's delay budget, as a bitmask per category
        self.late = [
            sum(1 << i for i in range(self.n) if d[i] + self.t_agg > limit)
            for _, d, limit in self.limits
        ]

    def f(self, mask: int) -> float:
        v = self.memo.get(mask)
        if v is None:
            v = self.memo[mask] = float(self._objective(mask))
        return v

    def energy(self, mask: int) -> float:
        if self._energy_of is not None:
            return self._energy_of(mask)
        e = self.problem.energy_j
        return sum(e[i] for i in range(self.n) if mask >> i & 1)

    def energy_ok(self, mask: int) -> bool:
        return self.e_max is None or self.energy(mask) <= self.e_max

    def first_late(self, mask: int) -> int:
        """Bitmask of the experts in `mask` that alone break a violated delay budget (the
        smallest such set over the violated categories); 0 when every delay budget holds."""
        best = 0
        for late in self.late:
            hit = mask & late
            if hit and (best == 0 or hit.bit_count() < best.bit_count()):
                best = hit
        return best

    def feasible(self, mask: int) -> bool:
        return self.first_late(mask) == 0 and self.energy_ok(mask)

    def ok_mask(self) -> int:
        return sum(1 << i for i in range(self.n) if self.feasible(1 << i))

    def infeasible_reason(self) -> str:
        parts = []
        for i, name in enumerate(self.problem.experts):
            why = []
            if not self.energy_ok(1 << i):
                why.append(f"energy {self.energy(1 << i):.4g} J > {self.e_max:.4g} J")
            for (c, d, limit), late in zip(self.limits, self.late, strict=True):
                if late >> i & 1:
                    why.append(f"{c} delay {d[i] + self.t_agg:.4g} s > {limit:.4g} s")
            parts.append(f"{name}: {', '.join(why)}")
        if not parts:
            return "no experts are registered"
        return "no expert meets the budget (" + "; ".join(parts) + ")"


def _wrap(
    problem: SelectionProblem, objective: Objective | MaskObjective, on_masks: bool
) -> MaskObjective:
    if on_masks:
        return objective  # type: ignore[return-value]
    return lambda mask: objective(problem.ids_of(mask))  # type: ignore[arg-type]


def _energy_wrap(
    problem: SelectionProblem, energy_of: Callable[[frozenset[str]], float] | None
) -> Callable[[int], float] | None:
    if energy_of is None:
        return None
    return lambda mask: energy_of(problem.ids_of(mask))


def top_k_energy(problem: SelectionProblem, k: int | None) -> Callable[[frozenset[str]], float]:
    """Worst-case energy of one request when only the top-k of S run: the sum of the k largest
    per-expert energies in S (k None or >= |S|: all of S). Non-decreasing in S, so the solver
    stays exact, and whichever k experts the gate picks inside S, the request stays within an
    energy budget that S meets."""
    if k is not None and k < 1:
        raise ValueError("k must be >= 1")
    energy = dict(zip(problem.experts, problem.energy_j, strict=True))

    def of(subset: frozenset[str]) -> float:
        values = sorted((energy[e] for e in subset), reverse=True)
        return sum(values if k is None else values[:k])

    return of


def _infeasible(inst: _Instance, stats: SolverStats) -> Selection:
    return Selection(frozenset(), -math.inf, False, inst.infeasible_reason(), stats)


def solve_brb(
    problem: SelectionProblem,
    budget: BudgetClass,
    objective: Objective | MaskObjective,
    *,
    eps: float = 0.0,
    on_masks: bool = False,
    energy_of: Callable[[frozenset[str]], float] | None = None,
    use_reduce: bool = True,
    use_latency_cut: bool = True,
) -> Selection:
    """Exact branch-reduce-bound over the subset lattice (see the module docstring).

    `objective` maps a frozenset of expert ids (or, with `on_masks`, a bitmask over
    `problem.experts`) to a value to maximise; it must be non-decreasing under inclusion for
    the optimality guarantee. `energy_of` replaces the additive energy (it must be
    non-decreasing too, e.g. an expected-energy model). With eps > 0 the answer is within eps
    of the optimum. `use_reduce` / `use_latency_cut` exist to measure and test those steps.
    """
    if eps < 0:
        raise ValueError("eps must be >= 0")
    start = time.perf_counter()
    inst = _Instance(
        problem, budget, _wrap(problem, objective, on_masks), _energy_wrap(problem, energy_of)
    )
    ok = inst.ok_mask()
    full = (1 << inst.n) - 1
    if ok == 0:
        return _infeasible(inst, SolverStats(seconds=time.perf_counter() - start))

    def reduce(mask: int) -> int:
        return mask & ok if use_reduce else mask

    best, lb = 0, -math.inf
    for i in range(inst.n):  # incumbent: the best feasible single expert (lowest index on ties)
        if ok >> i & 1 and inst.f(1 << i) > lb:
            best, lb = 1 << i, inst.f(1 << i)

    root = reduce(full)
    heap: list[tuple[float, int, int]] = []  # (-f(S), -|S|, S): best bound, then larger set
    seen = {root}
    pushed = expanded = 0
    if inst.f(root) > lb + eps:
        heap.append((-inst.f(root), -root.bit_count(), root))
        pushed = 1
    while heap:
        neg_ub, _, mask = heapq.heappop(heap)
        ub = -neg_ub
        if ub <= lb + eps:
            break
        expanded += 1
        late = inst.first_late(mask)
        if late == 0 and inst.energy_ok(mask):
            best, lb = mask, ub
            continue
        branch = late if (use_latency_cut and late) else mask
        while branch:
            bit = branch & -branch
            branch ^= bit
            child = reduce(mask & ~bit)
            if child == 0 or child in seen:
                continue
            seen.add(child)
            v = inst.f(child)
            if v > lb + eps:
                heapq.heappush(heap, (-v, -child.bit_count(), child))
                pushed += 1
    stats = SolverStats(expanded, len(inst.memo), pushed, time.perf_counter() - start)
    return Selection(problem.ids_of(best), lb, True, "", stats)


def solve_brute_force(
    problem: SelectionProblem,
    budget: BudgetClass,
    objective: Objective | MaskObjective,
    *,
    on_masks: bool = False,
    energy_of: Callable[[frozenset[str]], float] | None = None,
) -> Selection:
    """Enumerate every non-empty subset (2^N - 1 objective calls at most); the reference the
    branch-reduce-bound solver is tested against. Ties: larger set, then smaller bitmask."""
    start = time.perf_counter()
    inst = _Instance(
        problem, budget, _wrap(problem, objective, on_masks), _energy_wrap(problem, energy_of)
    )
    best, key = 0, (-math.inf, 0, 0)
    for mask in range(1, 1 << inst.n):
        if not inst.feasible(mask):
            continue
        k = (inst.f(mask), mask.bit_count(), -mask)
        if k > key:
            best, key = mask, k
    elapsed = time.perf_counter() - start
    stats = SolverStats(1 << inst.n, len(inst.memo), 0, elapsed)
    if best == 0:
        return _infeasible(inst, stats)
    return Selection(problem.ids_of(best), key[0], True, "", stats)


class SelectionCache:
    """Coarse selections keyed by (budget class, profiles version), so a request whose budget
    class was solved before pays only the fine level. A new profiles version (the registry
    bumps it when profiles or telemetry change the costs) drops every older entry. Bounded
    LRU; not thread-safe (the router uses it from one event loop)."""

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._maxsize = maxsize
        self._entries: OrderedDict[tuple[BudgetClass, int], Selection] = OrderedDict()
        self._version: int | None = None
        self.hits = 0
        self.misses = 0

    @property
    def version(self) -> int | None:
        return self._version

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_solve(
        self, budget: BudgetClass, version: int, solve: Callable[[], Selection]
    ) -> Selection:
        if version != self._version:
            self._entries.clear()
            self._version = version
        key = (budget, version)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        result = solve()
        self._entries[key] = result
        if len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)
        return result

    def invalidate(self) -> None:
        self._entries.clear()


def top_k(
    gate_scores: Mapping[str, float], subset: Iterable[str], k: int
) -> tuple[tuple[str, float], ...]:
    """Fine level: softmax of the gate logits restricted to `subset`, the k largest kept and
    renormalised (= the softmax over those k). Returns (expert id, weight) pairs, largest
    first; ties go to the smaller id. Weights sum to 1."""
    if k < 1:
        raise ValueError("k must be >= 1")
    members = sorted(set(subset))
    if not members:
        raise ValueError("the subset is empty")
    missing = [e for e in members if e not in gate_scores]
    if missing:
        raise KeyError(f"no gate score for {missing}")
    ranked = sorted(members, key=lambda e: (-gate_scores[e], e))[:k]
    top = max(gate_scores[e] for e in ranked)
    if math.isinf(top) and top < 0:  # every logit is -inf: uniform over the kept experts
        return tuple((e, 1.0 / len(ranked)) for e in ranked)
    exps = [math.exp(gate_scores[e] - top) for e in ranked]
    total = sum(exps)
    return tuple((e, x / total) for e, x in zip(ranked, exps, strict=True))
