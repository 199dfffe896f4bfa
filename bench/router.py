"""`python -m bench.router`: MoE² quality against budget on the trained gate (papers.md §1.5).

Offline arithmetic on the cached gate data (`make gate-data`) and the trained gate
(`artifacts/gate/gate.pt`): no model runs. For a grid of energy budgets (J per request,
log-spaced from below the cheapest expert to above all of them together) and a few delay
budgets (one level applied to every category), each method picks an expert subset S on the
**val** split only, and the subset is scored on the **test** split:

- `moe2`: the exact coarse level (`planner.plan`: branch-reduce-bound on the monotone hull of
  the gate's validation loss) with the fine-level worst-case energy `top_k_energy(problem, k)`;
- `best_single`: the feasible expert with the lowest validation loss;
- `random`: the mean over random maximal feasible subsets (experts in a random order, each
  added while the budget still holds), the full gate restricted to each;
- `greedy`: from the best single feasible expert, repeatedly add the expert with the largest
  validation-loss gain per added joule (of the budgeted energy) while feasible and improving;
- `uniform_on_moe2`: equal weights on MoE²'s own S (with top-k: k experts of S drawn
  uniformly per request), which isolates what the gate adds on top of the choice of S;
- references that ignore every budget: the gated mixture over all experts, and the oracle
  (each prompt sent to its best expert).

Costs come from the router's cost model: `REFERENCE_TIMINGS` per expert on the
`DEFAULT_DEVICES` profiles, request shapes per category in `CATEGORY_SHAPES`. Energy is
MODELLED (power x modelled compute time + transmit power x transmit time), never measured.

Checks (the run fails if either is non-zero): MoE²'s validation value equals brute force's
(`solve_brute_force` on the same hull objective, and the raw objective's best feasible value)
at every grid point, and MoE² is never worse on val than best-single or greedy.

Writes docs/bench/router.md, .json and router_quality.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.machine import cpu_name
from services.router.cost import Category
from services.router.gate import (
    Gate,
    mixture_loss,
    mixture_nll,
    oracle_loss,
    served_log_weights,
    uniform_loss,
)
from services.router.gate_data import DEFAULT_PATH, GateData, load
from services.router.planner import MonotoneHull, gate_objective, plan
from services.router.profiles import DEVICE_PROFILES, ExpertSpec
from services.router.reference import DEFAULT_DEVICES, REFERENCE_TIMINGS
from services.router.selection import (
    BudgetClass,
    SelectionProblem,
    solve_brute_force,
    top_k_energy,
)

OUT = Path("docs/bench")
GATE = Path("artifacts/gate/gate.pt")
LN2 = math.log(2)

# Request shape (prompt tokens, output tokens) per gate-data category, as a served request
# would have them: the gate data's own prompts are <= 96 characters (~25 tokens) with a
# 64-character continuation, but a served request generates more. Unknown categories get
# DEFAULT_SHAPE.
CATEGORY_SHAPES: Mapping[str, tuple[int, int]] = {
    "fortunes": (32, 64),  # prose: a short prompt, a paragraph out
    "stdlib": (64, 128),  # code: a function head + context in, a function body out
    "wordnet": (16, 32),  # definition: a word or two in, one sentence out
    "pydoc": (32, 96),  # reference docs: a paragraph in, a paragraph out
    "licenses": (32, 96),  # legal prose
    "chat-define": (24, 32),  # chat: "what does X mean?", one sentence out
    "chat-code": (48, 128),  # chat: a function spec in, its body out
    "chat-quote": (48, 32),  # chat: half a quotation in, its end out
}
DEFAULT_SHAPE = (32, 64)

METHODS = ("moe2", "best_single", "greedy", "random", "uniform_on_moe2")
LABELS = {
    "moe2": "MoE² (exact, gate on S)",
    "best_single": "best single feasible expert",
    "greedy": "greedy by val gain per joule",
    "random": "random maximal feasible subset (mean)",
    "uniform_on_moe2": "uniform weights on MoE²'s S",
    "all_gated": "all experts, gated (ignores budgets)",
    "oracle": "oracle, best expert per prompt (ignores budgets)",
}
TOL = 1e-12


def k_label(k: int | None) -> str:
    return "all" if k is None else str(k)


# --------------------------------------------------------------------------- problem


def expert_specs(experts: Sequence[str]) -> list[ExpertSpec]:
    """The shipped experts as the router's cost model prices them."""
    return [
        ExpertSpec(
            e,
            DEVICE_PROFILES[DEFAULT_DEVICES[e]],
            REFERENCE_TIMINGS[e].decode_s_per_token,
            REFERENCE_TIMINGS[e].prefill_s_per_token,
        )
        for e in experts
    ]


def categories_of(data: GateData) -> dict[Category, float]:
    """One `Category` per category of `data`, weighted by its share of the prompts."""
    names = sorted(set(data.categories))
    return {
        Category(c, *CATEGORY_SHAPES.get(c, DEFAULT_SHAPE)): data.categories.count(c) / len(data)
        for c in names
    }


def energy_grid(problem: SelectionProblem, n: int) -> list[float]:
    """`n` log-spaced budgets from half the cheapest expert to 1.5 x all experts together."""
    lo, hi = 0.5 * min(problem.energy_j), 1.5 * sum(problem.energy_j)
    return [float(x) for x in np.geomspace(lo, hi, n)]


def worst_delay(problem: SelectionProblem) -> list[float]:
    """Each expert's delay in its slowest category (+ t_agg)."""
    return [
        max(d[i] for _, d in problem.delay_s) + problem.t_agg_s for i in range(len(problem.experts))
    ]


def _round2(x: float) -> float:
    return float(f"{x:.2g}")


def delay_levels(problem: SelectionProblem, count: int = 3) -> list[float | None]:
    """`count` delay budgets (applied to every category) between the experts' worst-category
    delays, tightest first, then None (no limit). Each level sits at the midpoint between two
    consecutive distinct delays (rounded to 2 significant digits when that keeps it strictly
    between them), so each level admits a different set of experts: the tightest admits only
    the fastest expert, the loosest all but the slowest."""
    d = sorted(set(worst_delay(problem)))
    mids = []
    for a, b in itertools.pairwise(d):
        m, r = (a + b) / 2, _round2((a + b) / 2)
        mids.append(r if a < r < b else m)
    if len(mids) > count:
        idx = np.linspace(0, len(mids) - 1, count).round().astype(int)
        mids = [mids[i] for i in sorted(set(idx))]
    return [*mids, None]


def delay_label_short(limit: float | None) -> str:
    return "no delay limit" if limit is None else f"delay <= {limit:g} s"


def delay_label(problem: SelectionProblem, limit: float | None) -> str:
    if limit is None:
        return "no delay limit"
    ok = [e for e, d in zip(problem.experts, worst_delay(problem), strict=True) if d <= limit]
    return f"delay <= {limit:g} s ({', '.join(ok) or 'no expert'} fit)"


def budget_of(problem: SelectionProblem, energy_j: float, delay_s: float | None) -> BudgetClass:
    delays = {} if delay_s is None else {c: delay_s for c, _ in problem.delay_s}
    return BudgetClass.of(energy_j, delays)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class SubsetStats:
    """One subset under one fine-level k. Energies are modelled, J per request."""

    val_bpc: float
    test_bpc: float
    test_nats: float  # mean -log p_S(y|x) per test prompt, nats
    energy_worst_j: float  # top_k_energy: the k largest energies in S
    energy_expected_j: float  # sum_n pi_n e_n, pi_n = share of test prompts routed to n
    delay_s: float  # slowest category, max over S (+ t_agg)


class Evaluator:
    """Memoised per-(subset, k) statistics of the gate restricted to S, on val and test."""

    def __init__(
        self, gate: Gate, val: GateData, test: GateData, problem: SelectionProblem
    ) -> None:
        if tuple(gate.experts) != tuple(problem.experts):
            raise ValueError(f"gate experts {gate.experts} != problem {problem.experts}")
        self.gate, self.val, self.test, self.problem = gate, val, test, problem
        self.energy = dict(zip(problem.experts, problem.energy_j, strict=True))
        self._objective: dict[int | None, Callable[[frozenset[str]], float]] = {}
        self._hull: dict[int | None, MonotoneHull] = {}
        self._stats: dict[tuple[frozenset[str], int | None], SubsetStats] = {}
        self._uniform: dict[tuple[frozenset[str], int | None], tuple[float, float]] = {}
        with torch.no_grad():
            self._test_logits = gate(torch.as_tensor(test.features, dtype=torch.float32)).double()
        self._test_nll = torch.as_tensor(test.nll, dtype=torch.float64)

    def objective(self, k: int | None) -> Callable[[frozenset[str]], float]:
        """The planner's objective -L_val(S) in bits/char (memoised)."""
        if k not in self._objective:
            self._objective[k] = gate_objective(self.gate, self.val, k)
        return self._objective[k]

    def hull(self, k: int | None) -> MonotoneHull:
        if k not in self._hull:
            self._hull[k] = MonotoneHull(self.objective(k))
        return self._hull[k]

    def energy_of(self, k: int | None) -> Callable[[frozenset[str]], float]:
        return top_k_energy(self.problem, k)

    def delay(self, subset: frozenset[str]) -> float:
        idx = [i for i, e in enumerate(self.problem.experts) if e in subset]
        return max(max(d[i] for i in idx) for _, d in self.problem.delay_s) + self.problem.t_agg_s

    def feasible(self, subset: frozenset[str], budget: BudgetClass, k: int | None) -> bool:
        if not subset:
            return False
        if budget.energy_j is not None and self.energy_of(k)(subset) > budget.energy_j:
            return False
        idx = [i for i, e in enumerate(self.problem.experts) if e in subset]
        for c, d in self.problem.delay_s:
            limit = budget.delay_for(c)
            if limit is not None and max(d[i] for i in idx) + self.problem.t_agg_s > limit:
                return False
        return True

    def stats(self, subset: frozenset[str], k: int | None) -> SubsetStats:
        key = (subset, k)
        hit = self._stats.get(key)
        if hit is not None:
            return hit
        log_w = served_log_weights(
            self.gate, self.test.features, self._test_logits, self.gate.mask(subset), k
        )
        nats = mixture_nll(log_w, self._test_nll).numpy()
        routed = torch.isfinite(log_w).double().mean(0).numpy()  # pi_n on test
        expected = sum(
            float(p) * self.energy[e] for e, p in zip(self.problem.experts, routed, strict=True)
        )
        out = self._stats[key] = SubsetStats(
            val_bpc=-self.objective(k)(subset),
            test_bpc=mixture_loss(self.gate, self.test, sorted(subset), k),
            test_nats=float(nats.mean()),
            energy_worst_j=self.energy_of(k)(subset),
            energy_expected_j=expected,
            delay_s=self.delay(subset),
        )
        return out

    def uniform(self, subset: frozenset[str], k: int | None) -> tuple[float, float]:
        """(test bits/char, test nats/prompt) of equal weights on S; with top-k, k members of
        S drawn uniformly per request (the expectation over those draws)."""
        key = (subset, k)
        if key not in self._uniform:
            size = len(subset) if k is None else min(k, len(subset))
            draws = list(itertools.combinations(sorted(subset), size))
            bpc = float(np.mean([uniform_loss(self.test, t) for t in draws]))
            nats = bpc * LN2 * float(self.test.chars.sum()) / len(self.test)
            self._uniform[key] = (bpc, nats)
        return self._uniform[key]


# --------------------------------------------------------------------------- methods


def moe2_select(ev: Evaluator, budget: BudgetClass, k: int | None) -> frozenset[str] | None:
    """The planner's choice (`planner.plan`) with the fine level's worst-case energy."""
    energy_of = ev.energy_of(k)
    sel = plan(ev.problem, budget, ev.gate, ev.val, k, hull=True, energy_of=energy_of)
    return sel.experts if sel.feasible else None


def singles(ev: Evaluator, budget: BudgetClass, k: int | None) -> list[frozenset[str]]:
    return [frozenset({e}) for e in ev.problem.experts if ev.feasible(frozenset({e}), budget, k)]


def best_single(ev: Evaluator, budget: BudgetClass, k: int | None) -> frozenset[str] | None:
    """Lowest validation loss among the individually feasible experts (first on ties)."""
    f = ev.objective(k)
    best = None
    for s in singles(ev, budget, k):
        if best is None or f(s) > f(best):
            best = s
    return best


def greedy(ev: Evaluator, budget: BudgetClass, k: int | None) -> frozenset[str] | None:
    """From the best single feasible expert, add the expert with the largest validation gain
    per added joule of the budgeted (worst-case top-k) energy while feasible and improving. An
    addition that costs no budgeted energy (with top-k, a cheaper expert than the k dearest
    already in S) ranks first; ties go to the larger gain, then the expert order."""
    s = best_single(ev, budget, k)
    if s is None:
        return None
    f, energy_of = ev.objective(k), ev.energy_of(k)
    while True:
        best_key, best_t = None, None
        for i, e in enumerate(ev.problem.experts):
            if e in s:
                continue
            t = s | {e}
            if not ev.feasible(t, budget, k):
                continue
            gain = f(t) - f(s)
            if gain <= 0:
                continue
            added = energy_of(t) - energy_of(s)
            key = (math.inf if added <= 0 else gain / added, gain, -i)
            if best_key is None or key > best_key:
                best_key, best_t = key, t
        if best_t is None:
            return s
        s = best_t


def random_subsets(
    ev: Evaluator, budget: BudgetClass, k: int | None, draws: int, seed: int
) -> list[frozenset[str]]:
    """`draws` random maximal feasible subsets: experts in a random order, each added while
    the budget still holds (feasible sets are down-closed, so the result is maximal)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        s: frozenset[str] = frozenset()
        for i in rng.permutation(len(ev.problem.experts)):
            t = s | {ev.problem.experts[int(i)]}
            if ev.feasible(t, budget, k):
                s = t
        if not s:
            return []
        out.append(s)
    return out


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class Row:
    """One method at one grid point. Infeasible: `feasible` False, every value None.
    Energies are modelled (J per request); `energy_worst_j` is what the budget constrains."""

    top_k: str  # "1", "2", ..., or "all"
    delay_budget_s: float | None
    energy_budget_j: float
    method: str
    feasible: bool
    subset: tuple[str, ...] = ()  # random: empty (see `draws`)
    val_bpc: float | None = None
    test_bpc: float | None = None
    test_nats: float | None = None
    energy_worst_j: float | None = None
    energy_expected_j: float | None = None
    delay_s: float | None = None
    draws: int = 0  # random: how many subsets were averaged; distinct ones in `note`
    note: str = ""


def _row(ev: Evaluator, k, delay, energy, method, subset: frozenset[str] | None, note="") -> Row:
    if subset is None:
        return Row(k_label(k), delay, energy, method, False)
    st = ev.stats(subset, k)
    return Row(
        k_label(k),
        delay,
        energy,
        method,
        True,
        tuple(e for e in ev.problem.experts if e in subset),
        st.val_bpc,
        st.test_bpc,
        st.test_nats,
        st.energy_worst_j,
        st.energy_expected_j,
        st.delay_s,
        note=note,
    )


@dataclass
class Checks:
    points: int = 0
    feasible_points: int = 0
    bf_mismatches: int = 0  # MoE² val value != brute force on the hull objective
    raw_mismatches: int = 0  # MoE² val value != best feasible raw objective (enumerated)
    worse_than_single: int = 0  # MoE² val loss > best single's (must be 0)
    worse_than_greedy: int = 0  # MoE² val loss > greedy's (must be 0)
    planner_path: str = ""

    def failed(self) -> bool:
        return bool(
            self.bf_mismatches
            + self.raw_mismatches
            + self.worse_than_single
            + self.worse_than_greedy
        )


def sweep(
    ev: Evaluator,
    ks: Sequence[int | None],
    energies: Sequence[float],
    delays: Sequence[float | None],
    draws: int = 64,
    seed: int = 0,
) -> tuple[list[Row], Checks]:
    """Every method at every (k, delay budget, energy budget); selection on val, scores on
    test. Also checks MoE² against brute force on val."""
    rows: list[Row] = []
    checks = Checks(planner_path="planner.plan(energy_of=top_k_energy)")
    n = len(ev.problem.experts)
    every = [ev.problem.ids_of(m) for m in range(1, 1 << n)]
    for k in ks:
        f, hull = ev.objective(k), ev.hull(k)
        for delay in delays:
            for energy in energies:
                budget = budget_of(ev.problem, energy, delay)
                checks.points += 1
                moe2 = moe2_select(ev, budget, k)
                # brute force on the same (hull) objective and over the raw objective
                bf = solve_brute_force(ev.problem, budget, hull, energy_of=ev.energy_of(k))
                raw = [f(s) for s in every if ev.feasible(s, budget, k)]
                value = None if moe2 is None else f(moe2)
                if (moe2 is None) != (not bf.feasible) or (
                    value is not None and abs(value - bf.value) > TOL
                ):
                    checks.bf_mismatches += 1
                if (moe2 is None) != (not raw) or (
                    value is not None and abs(value - max(raw)) > TOL
                ):
                    checks.raw_mismatches += 1
                single, grd = best_single(ev, budget, k), greedy(ev, budget, k)
                if moe2 is not None:
                    checks.feasible_points += 1
                    if single is not None and f(single) > value + TOL:  # type: ignore[operator]
                        checks.worse_than_single += 1
                    if grd is not None and f(grd) > value + TOL:  # type: ignore[operator]
                        checks.worse_than_greedy += 1
                rows.append(_row(ev, k, delay, energy, "moe2", moe2))
                rows.append(_row(ev, k, delay, energy, "best_single", single))
                rows.append(_row(ev, k, delay, energy, "greedy", grd))
                rows.append(_random_row(ev, k, delay, energy, budget, draws, seed))
                rows.append(_uniform_row(ev, k, delay, energy, moe2))
    return rows, checks


def _random_row(ev, k, delay, energy, budget, draws, seed) -> Row:
    subsets = random_subsets(ev, budget, k, draws, seed)
    if not subsets:
        return Row(k_label(k), delay, energy, "random", False)
    st = [ev.stats(s, k) for s in subsets]
    counts: dict[tuple[str, ...], int] = {}
    for s in subsets:
        key = tuple(e for e in ev.problem.experts if e in s)
        counts[key] = counts.get(key, 0) + 1
    note = "; ".join(f"{'+'.join(s)} x{c}" for s, c in sorted(counts.items(), key=lambda x: -x[1]))
    return Row(
        k_label(k),
        delay,
        energy,
        "random",
        True,
        (),
        float(np.mean([x.val_bpc for x in st])),
        float(np.mean([x.test_bpc for x in st])),
        float(np.mean([x.test_nats for x in st])),
        float(np.mean([x.energy_worst_j for x in st])),
        float(np.mean([x.energy_expected_j for x in st])),
        float(np.mean([x.delay_s for x in st])),
        draws=len(subsets),
        note=note,
    )


def _uniform_row(ev, k, delay, energy, subset) -> Row:
    if subset is None:
        return Row(k_label(k), delay, energy, "uniform_on_moe2", False)
    bpc, nats = ev.uniform(subset, k)
    size = len(subset) if k is None else min(k, len(subset))
    total = sum(ev.energy[e] for e in subset)
    return Row(
        k_label(k),
        delay,
        energy,
        "uniform_on_moe2",
        True,
        tuple(e for e in ev.problem.experts if e in subset),
        None,
        bpc,
        nats,
        ev.energy_of(k)(subset),
        total * size / len(subset),
        ev.delay(subset),
        note="equal weights; with top-k, k of S drawn uniformly per request",
    )


def references(ev: Evaluator, ks: Sequence[int | None]) -> list[dict]:
    """Budget-blind references per k: the gated mixture over all experts, every single
    expert, the uniform ensemble and the oracle (test)."""
    out = []
    full = frozenset(ev.problem.experts)
    per_prompt = float(ev.test.chars.sum()) / len(ev.test) * LN2
    for k in ks:
        st = ev.stats(full, k)
        out.append({"top_k": k_label(k), "method": "all_gated", **asdict(st)})
    oracle = oracle_loss(ev.test)
    out.append(
        {"top_k": "1", "method": "oracle", "test_bpc": oracle, "test_nats": oracle * per_prompt}
    )
    for e in ev.problem.experts:
        st = ev.stats(frozenset({e}), None)
        out.append({"top_k": "-", "method": f"single:{e}", **asdict(st)})
    return out


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    return f"{100 * (a / b - 1):+.2f}%"


def _pick(rows: list[Row], k: str, delay, energy, method) -> Row:
    for r in rows:
        if (r.top_k, r.delay_budget_s, r.energy_budget_j, r.method) == (k, delay, energy, method):
            return r
    raise KeyError((k, delay, energy, method))


def _subset(r: Row) -> str:
    return "+".join(r.subset) if r.feasible else "infeasible"


def render(result: dict, rows: list[Row], extra_sections: Sequence[tuple[str, str]] = ()) -> str:
    """The markdown report. `extra_sections`: (title, markdown body) pairs appended at the
    end (e.g. a router-overhead section from another benchmark)."""
    cfg, problem = result["config"], result["problem"]
    checks = result["checks"]
    lines = [
        "# MoE² quality against budget: exact coarse level vs baselines",
        "",
        f"Machine: {result['machine']}. Generated by `python -m bench.router` in "
        f"{result['wall_s']:.1f} s (offline arithmetic on cached data; no model runs).",
        "",
        "## Setup",
        "",
        f"- Data: the cached gate data (`{cfg['data']}`); every expert's teacher-forced NLL of "
        f"the reference continuation. Selection uses the **val** split only "
        f"({cfg['val_prompts']} prompts); every number below is on the **test** split "
        f"({cfg['test_prompts']} prompts) unless it says val. Gate: `{cfg['gate']}`, trained "
        "once on all experts (docs/bench/gate.md), its logits masked to S.",
        "- Quality: bits per character of the gated sequence-level mixture "
        "(`mixture_loss`), and the same loss in nats per prompt, mean -log p_S(y|x). With a "
        "fixed test set the two are proportional (nats/prompt = bits/char x ln 2 x "
        f"{cfg['test_chars_per_prompt']:.1f} characters per prompt), so the plot shows both on "
        "one axis pair. Lower is better.",
        "- Experts and costs: "
        + ", ".join(
            f"{e} on {d} ({ej:.1f} J, slowest category {dl:.2f} s)"
            for e, d, ej, dl in zip(
                problem["experts"],
                problem["devices"],
                problem["energy_j"],
                problem["worst_delay_s"],
                strict=True,
            )
        )
        + ". Per-token times: `services/router/reference.py` (measured on the reference CPU, "
        "scaled by each device profile's speed factor). **Energy is modelled** (device power x "
        "modelled compute time + transmit power x transmit time, `services/router/cost.py`); "
        "no power meter was read.",
        "- Request shapes (prompt -> output tokens), weights = share of the test split: "
        + ", ".join(
            f"{c['name']} {c['prompt_tokens']} -> {c['output_tokens']} ({c['weight']:.2f})"
            for c in problem["categories"]
        )
        + ". An expert's energy is its mean over this mix.",
        f"- Energy budgets: {len(cfg['energies'])} log-spaced values, "
        f"{cfg['energies'][0]:.1f} to {cfg['energies'][-1]:.0f} J per request (half the "
        "cheapest expert to 1.5 x all experts together). The budget constrains the fine "
        "level's **worst case**: `top_k_energy(problem, k)`, the k largest energies in S "
        "(all of S for the full mixture), as the router serves it. `E worst` is that value, "
        "`E exp` the expected energy under the gate's top-k routing on test.",
        "- Delay budgets (one level for every category, picked between the experts' "
        "worst-category delays so each admits a different set): "
        + "; ".join(cfg["delay_labels"])
        + ". t_agg = 0.",
        "- Fine level k: " + ", ".join(f"top-{k}" for k in cfg["ks"]) + " (top-all = the "
        "full softmax over S; top-1 = the pick the router serves, the gate's safe router "
        "where it has one for S (`gate.served_log_weights`), on val for the choice and on "
        "test for the score; the safe router was fitted on train + val, so val is in-sample "
        "for it).",
        "- Methods (all choose on val, score on test): "
        + "; ".join(f"`{m}` = {LABELS[m]}" for m in METHODS)
        + f". `random` averages {cfg['draws']} draws (seed {cfg['seed']}): experts in a "
        "random order, each added while the budget holds. `greedy` starts from the best "
        "single expert and adds the largest val gain per added (budgeted) joule while "
        "feasible and improving. `uniform_on_moe2` runs MoE²'s S with equal weights (top-k: k "
        "members of S drawn uniformly per request, same worst-case energy), isolating the "
        "gate's contribution from the choice of S.",
        "",
        "## Checks",
        "",
        f"- MoE² ({checks['planner_path']}) against brute force on val, at all "
        f"{checks['points']} grid points ({checks['feasible_points']} feasible): "
        f"**{checks['bf_mismatches']} mismatches** with `solve_brute_force` on the hull "
        f"objective, {checks['raw_mismatches']} with the best feasible raw objective "
        "(every subset enumerated).",
        f"- MoE² worse on val than best single: {checks['worse_than_single']} points; than "
        f"greedy: {checks['worse_than_greedy']} points (exact on val, so both must be 0).",
        "",
        "## Budget-blind references (test)",
        "",
        "| reference | k | bits/char | nats/prompt | E worst (J) | E exp (J) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for ref in result["references"]:
        lines.append(
            f"| {LABELS.get(ref['method'], ref['method'])} | {ref['top_k']} | "
            f"{ref['test_bpc']:.3f} | {ref['test_nats']:.2f} | "
            f"{_fmt(ref.get('energy_worst_j'), '.1f')} | "
            f"{_fmt(ref.get('energy_expected_j'), '.1f')} |"
        )
    energies = cfg["energies"]
    for k in cfg["ks"]:
        lines += ["", f"## Fine level top-{k}", ""]
        for delay, dlabel in zip(cfg["delays"], cfg["delay_labels"], strict=True):
            show = breakpoints(rows, k, delay, energies)
            lines += [
                f"### {dlabel}",
                "",
                "Test bits/char; the ratio columns are test bits/char relative to best single "
                "(uniform: relative to MoE²). One row per energy budget where a method's choice "
                "changes (the full grid is in router.json). `—` / infeasible: no expert fits.",
                "",
                "| E budget (J) | MoE² S | MoE² | E worst / exp (J) | best single | greedy "
                "| random | uniform on S | MoE² vs single | greedy vs single "
                "| random vs single | uniform vs MoE² |",
                "|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
            ]
            for i in show:
                e = energies[i]
                m = _pick(rows, k, delay, e, "moe2")
                s = _pick(rows, k, delay, e, "best_single")
                g = _pick(rows, k, delay, e, "greedy")
                r = _pick(rows, k, delay, e, "random")
                u = _pick(rows, k, delay, e, "uniform_on_moe2")
                lines.append(
                    f"| {e:.1f} | {_subset(m)} | {_fmt(m.test_bpc)} | "
                    f"{_fmt(m.energy_worst_j, '.1f')} / {_fmt(m.energy_expected_j, '.1f')} | "
                    f"{_subset(s)} {_fmt(s.test_bpc)} | {_subset(g)} {_fmt(g.test_bpc)} | "
                    f"{_fmt(r.test_bpc)} | {_fmt(u.test_bpc)} | "
                    f"{_pct(m.test_bpc, s.test_bpc)} | {_pct(g.test_bpc, s.test_bpc)} | "
                    f"{_pct(r.test_bpc, s.test_bpc)} | {_pct(u.test_bpc, m.test_bpc)} |"
                )
            lines.append("")
    lines += ["## Summary over the grid", "", *summary_table(rows, cfg), ""]
    lines += ["## Discussion", "", *result.get("discussion", []), ""]
    lines += ["![quality against energy budget](router_quality.png)", ""]
    for title, body in extra_sections:
        lines += [f"## {title}", "", body.rstrip(), ""]
    return "\n".join(lines)


def breakpoints(rows: list[Row], k: str, delay, energies: Sequence[float]) -> list[int]:
    """Grid indices where MoE², best single or greedy changes its subset (and the first and
    last budget), so a table shows every regime of a curve in a few rows."""
    out, last = [], None
    for i, e in enumerate(energies):
        key = tuple(_pick(rows, k, delay, e, m).subset for m in ("moe2", "best_single", "greedy"))
        if key != last or i == len(energies) - 1:
            out.append(i)
        last = key
    return out


def summary_table(rows: list[Row], cfg: dict) -> list[str]:
    out = [
        "Over the feasible energy budgets of each curve: how often MoE² beats best single on "
        "test (strictly, by more than 1e-9), and the mean / best relative change of test "
        "bits/char vs best single; the same for greedy.",
        "",
        "| k | delay budget | feasible points | MoE² < single (test) | MoE² vs single mean / "
        "best | greedy vs single mean / best | MoE² < single (val) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for k in cfg["ks"]:
        for delay, label in zip(cfg["delays"], cfg["delay_labels"], strict=True):
            pts = [
                (
                    _pick(rows, k, delay, e, "moe2"),
                    _pick(rows, k, delay, e, "best_single"),
                    _pick(rows, k, delay, e, "greedy"),
                )
                for e in cfg["energies"]
            ]
            pts = [p for p in pts if p[0].feasible]
            if not pts:
                out.append(f"| {k} | {label} | 0 | — | — | — | — |")
                continue
            rm = np.array([m.test_bpc / s.test_bpc - 1 for m, s, _ in pts])
            rg = np.array([g.test_bpc / s.test_bpc - 1 for _, s, g in pts])
            wins = sum(m.test_bpc < s.test_bpc - 1e-9 for m, s, _ in pts)
            vwins = sum(m.val_bpc < s.val_bpc - 1e-9 for m, s, _ in pts)
            out.append(
                f"| {k} | {label} | {len(pts)} | {wins} | {100 * rm.mean():+.1f}% / "
                f"{100 * rm.min():+.1f}% | {100 * rg.mean():+.1f}% / {100 * rg.min():+.1f}% | "
                f"{vwins} |"
            )
    return out


def discussion(rows: list[Row], result: dict) -> list[str]:
    """A few numbers-backed observations (generated, so they stay true on a rerun)."""
    cfg = result["config"]
    out = []
    refs = {(r["method"], r["top_k"]): r for r in result["references"]}
    singles_ = {r["method"][7:]: r for r in result["references"] if r["method"][:7] == "single:"}
    best = min(singles_, key=lambda e: singles_[e]["test_bpc"])
    full = refs.get(("all_gated", "all"))
    out.append(
        f"- The best single expert on test is {best} ({singles_[best]['test_bpc']:.3f} "
        f"bits/char, {singles_[best]['energy_worst_j']:.0f} J modelled)"
        + (
            f"; the gated mixture over all experts reaches {full['test_bpc']:.3f} "
            f"({100 * (full['test_bpc'] / singles_[best]['test_bpc'] - 1):+.1f}%) at "
            f"{full['energy_worst_j']:.0f} J"
            if full
            else ""
        )
        + f", the oracle {refs[('oracle', '1')]['test_bpc']:.3f}. Once a budget admits "
        f"{best}, the headroom any selection has over it is that small on this data "
        f"({cfg['test_prompts']} test prompts), and differences of a few tenths of a percent "
        f"are within noise. The gains are below {best}'s energy, where only the cheaper "
        "experts fit and mixing them beats the best of them.",
    )
    for k in cfg["ks"]:
        loose = [
            (e, _pick(rows, k, None, e, "moe2"), _pick(rows, k, None, e, "best_single"))
            for e in cfg["energies"]
        ]
        loose = [x for x in loose if x[1].feasible]
        if loose:
            gain = [(m.test_bpc / s.test_bpc - 1, e, m, s) for e, m, s in loose]
            g, e, m, s = min(gain)
            out.append(
                f"- top-{k}, no delay limit: MoE²'s largest test gain over best single is "
                f"{100 * g:+.1f}% at {e:.1f} J ({_subset(m)} vs {_subset(s)})."
            )
            worse = [x for x in gain if x[0] > 1e-9]
            if worse:
                g2, e2, m2, s2 = max(worse)
                out.append(
                    f"  MoE² is worse than best single on test at {len(worse)} of "
                    f"{len(gain)} budgets (worst {100 * g2:+.1f}% at {e2:.1f} J, "
                    f"{_subset(m2)} vs {_subset(s2)}): it is exact on **val** "
                    f"({cfg['val_prompts']} prompts), and val-optimal is not test-optimal."
                )
    for k in cfg["ks"]:
        if k == "all":
            continue
        # MoE² kept a single expert although a multi-expert subset fit (random drew one)
        lone = [
            r
            for r in rows
            if r.method == "moe2"
            and r.top_k == k
            and r.feasible
            and len(r.subset) == 1
            and "+" in _pick(rows, k, r.delay_budget_s, r.energy_budget_j, "random").note
        ]
        if lone and k == "1":
            out.append(
                f"- top-1: at {len(lone)} grid points a multi-expert S fit the budget but "
                "MoE² kept one expert, because on val the served top-1 inside those subsets "
                "(the safe router, docs/bench/gate.md) is no better than their best member "
                "alone: where its threshold is ∞ it always serves the subset's prior, so adding "
                "experts to S costs energy and buys nothing. The selection itself is exact on "
                "val."
            )
        elif lone:
            out.append(
                f"- top-{k}: at {len(lone)} grid points a multi-expert S fit the budget but "
                f"MoE² kept one expert, because on val the gate's top-{k} routing inside "
                "those subsets is worse than their best member alone. The gate was trained "
                "with the full softmax over all experts; its argmax among the cheap experts "
                "alone is weakly trained. A gate trained for top-k (or retrained on S) would "
                "likely help there; the selection itself is exact on val."
            )
    for k in cfg["ks"]:
        pairs = [
            (r, _pick(rows, k, r.delay_budget_s, r.energy_budget_j, "uniform_on_moe2"))
            for r in rows
            if r.method == "moe2" and r.top_k == k and r.feasible and len(r.subset) > 1
        ]
        if pairs:
            d = np.array([u.test_bpc / m.test_bpc - 1 for m, u in pairs])
            why = (
                "with the full softmax every member of S runs, and a sequence-level mixture "
                "leaves weights little to add (uniform is within log2|S| bits per prompt of "
                "the oracle)"
                if k == "all"
                else f"with top-{k} the uniform draw is a random {k} of S, so the gate's "
                "routing is what makes a multi-expert S pay"
            )
            out.append(
                f"- Gate vs uniform weights on MoE²'s S, top-{k} ({len(pairs)} grid points "
                f"with |S| > 1): uniform is {100 * d.mean():+.1f}% on average (range "
                f"{100 * d.min():+.1f}% to {100 * d.max():+.1f}%); {why}."
            )
    feas = [r for r in rows if r.method == "moe2" and r.feasible]
    same = sum(
        _pick(rows, r.top_k, r.delay_budget_s, r.energy_budget_j, "greedy").subset == r.subset
        for r in feas
    )
    out.append(
        f"- Greedy picks the same subset as MoE² at {same} of {len(feas)} feasible grid "
        "points: with 4 experts, a clear quality ranking and one very expensive expert, "
        "the gain-per-joule order rarely misleads. MoE²'s exactness matters more with more "
        "experts and less separable costs (bench/router_solver.py covers solve time there)."
    )
    for r in feas:
        g = _pick(rows, r.top_k, r.delay_budget_s, r.energy_budget_j, "greedy")
        if g.subset != r.subset:
            out.append(
                f"  - top-{r.top_k}, {delay_label_short(r.delay_budget_s)}, "
                f"{r.energy_budget_j:.1f} J: MoE² {_subset(r)} (val {r.val_bpc:.4f}, test "
                f"{r.test_bpc:.4f}) vs greedy {_subset(g)} (val {g.val_bpc:.4f}, test "
                f"{g.test_bpc:.4f})."
            )
    experts = result["problem"]["experts"]
    wd, ej = result["problem"]["worst_delay_s"], result["problem"]["energy_j"]
    fastest = experts[int(np.argmin(wd))]
    if cfg["delays"][0] is not None:
        costly = fastest == experts[int(np.argmax(ej))]
        out.append(
            f"- The tightest delay level admits only the fastest expert, {fastest} "
            f"({min(wd):.2f} s, {ej[int(np.argmin(wd))]:.0f} J)"
            + (
                ", which is also the most energy-hungry: below its energy every method is "
                "infeasible, above it every method returns it. Fast-but-costly against "
                "cheap-but-slow is what makes the two budgets interact."
                if costly
                else "."
            )
        )
    out.append(
        "- Energy and delay are modelled from reference CPU timings scaled by assumed "
        "device speed factors and powers; the ranking of experts by cost, and so every "
        "curve's breakpoints, moves with those assumptions."
    )
    return [x for x in out if x]


def plot(rows: list[Row], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    ks, delays = cfg["ks"], cfg["delays"]
    per_prompt = cfg["test_chars_per_prompt"] * LN2
    fig, axes = plt.subplots(
        len(ks),
        len(delays),
        figsize=(4.2 * len(delays), 3.6 * len(ks)),
        squeeze=False,
        sharey=True,
    )
    styles = {
        "moe2": ("o-", "C0"),
        "best_single": ("s--", "C1"),
        "greedy": ("^:", "C2"),
        "random": ("x-.", "C3"),
        "uniform_on_moe2": ("d:", "C4"),
    }
    refs = {(r["method"], r["top_k"]): r for r in result["references"]}
    for row_i, k in enumerate(ks):
        for col, (delay, label) in enumerate(zip(delays, cfg["delay_labels"], strict=True)):
            ax = axes[row_i][col]
            for method in METHODS:
                pts = [
                    (r.energy_budget_j, r.test_bpc)
                    for r in rows
                    if r.method == method
                    and r.top_k == k
                    and r.delay_budget_s == delay
                    and r.feasible
                ]
                if pts:
                    style, color = styles[method]
                    ax.plot(*zip(*pts, strict=True), style, color=color, ms=3, label=LABELS[method])
            full = refs.get(("all_gated", k))
            if full:
                ax.axhline(full["test_bpc"], color="k", lw=0.8, ls="--", label=LABELS["all_gated"])
            ax.axhline(refs[("oracle", "1")]["test_bpc"], color="grey", lw=0.8, ls=":",
                       label=LABELS["oracle"])  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlim(cfg["energies"][0], cfg["energies"][-1])
            ax.set_title(f"top-{k}, {label}", fontsize=8)
            ax.set_xlabel("energy budget, J/request (modelled)", fontsize=8)
            if col == 0:
                ax.set_ylabel("test bits/char", fontsize=8)
            sec = ax.secondary_yaxis(
                "right", functions=(lambda b: b * per_prompt, lambda n: n / per_prompt)
            )
            if col == len(delays) - 1:
                sec.set_ylabel("test nats/prompt", fontsize=8)
            ax.tick_params(labelsize=7)
            sec.tick_params(labelsize=7)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def run(
    gate: Gate,
    val: GateData,
    test: GateData,
    problem: SelectionProblem,
    ks: Sequence[int | None] = (1, None),
    n_energies: int = 25,
    delays: Sequence[float | None] | None = None,
    draws: int = 64,
    seed: int = 0,
) -> tuple[list[Row], Checks, Evaluator, list[float], list[float | None]]:
    """The core computation (no I/O): the grid, every method, the checks."""
    ev = Evaluator(gate, val, test, problem)
    energies = energy_grid(problem, n_energies)
    levels = list(delay_levels(problem) if delays is None else delays)
    rows, checks = sweep(ev, ks, energies, levels, draws, seed)
    return rows, checks, ev, energies, levels


def _parse_k(text: str) -> list[int | None]:
    return [None if t.strip() in ("all", "none") else int(t) for t in text.split(",")]


def _parse_delays(text: str) -> list[float | None]:
    return [None if t.strip() == "none" else float(t) for t in text.split(",")]


def served_sections(
    splits: dict[str, GateData], out: Path, data: Path = DEFAULT_PATH
) -> list[tuple[str, str]]:
    """What the router serves, held out by domain (services.router.gate_lodo) and the token
    mixture of qwen05 + qwen15 (bench.token_mixture, when its cache is there)."""
    from bench import token_mixture
    from services.router.gate_lodo import lodo_report, pooled

    cached = out / "gate.json"
    blob = json.loads(cached.read_text()) if cached.exists() else {}
    mtime = blob.get("data", {}).get("mtime")
    if mtime is not None and mtime == data.stat().st_mtime and "markdown" in blob:
        lodo, summary = blob["markdown"], blob  # written by `make gate` on this very data
    else:
        lodo, summary = lodo_report(pooled(splits))
    sections = [("Served quality, leave one domain out", "\n".join(lodo[2:]))]
    extra: dict = {"lodo": summary}
    prompts = sorted(Path(data.parent / "jobs").glob("*/prompts.json"))
    if token_mixture.CACHE.exists() and prompts:
        lines, mix = token_mixture.report(prompts[-1], 20, token_mixture.CACHE)
        text = (
            f"{mix['prompts']} prompts (20 per domain); the gate's weights for each domain "
            "come from a gate trained on the other domains (mean weight on qwen15 "
            f"{mix['mean_w_qwen15']:.2f}). The token mixture row is what the router serves "
            "at k = 2 on these experts (`token_mixture` with `top_k=0`), "
            "scored on the reference continuation; energy is MODELLED (both experts run "
            "every token).\n\n" + "\n".join(lines)
        )
        sections.append(("Token mixture (served) against top-1", text))
        extra["token_mixture"] = mix
    # k > 1 across tokenizers (bench.router_self_score, when run on this very data).
    own = out / "router_self_score.json"
    blob = json.loads(own.read_text()) if own.exists() else {}
    if blob.get("data", {}).get("mtime") == data.stat().st_mtime and "markdown" in blob:
        sections.append(
            (
                "k > 1 across tokenizers: the pick by prompt scores, leave one domain out",
                blob["markdown"],
            )
        )
    (out / "router_served.json").write_text(json.dumps(extra, indent=1) + "\n")
    return sections


def main(argv: list[str] | None = None, extra_sections: Sequence[tuple[str, str]] = ()) -> dict:
    """Run the benchmark and write the report; `extra_sections` ((title, markdown) pairs)
    are appended to router.md, e.g. by a router-overhead benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_PATH)
    p.add_argument("--gate", type=Path, default=GATE)
    p.add_argument("--top-k", default="1,all", help="fine levels, comma-separated ('all')")
    p.add_argument("--energies", type=int, default=25, help="energy budgets on the grid")
    p.add_argument(
        "--delays", default=None, help="delay budgets in s, comma-separated, 'none' = no limit"
    )
    p.add_argument("--draws", type=int, default=64, help="random subsets per grid point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    for path, how in ((a.data, "make gate-data"), (a.gate, "python -m services.router.gate")):
        if not path.exists():
            raise SystemExit(f"missing {path}; run `{how}` first")
    start = time.perf_counter()
    splits = load(a.data)
    # The budget sweep needs every expert's loss on a prompt: the rows all were scored on
    # (a budgeted gate-data may leave the largest expert unscored on most prompts).
    val, test = splits["val"].complete(), splits["test"].complete()
    gate = Gate.load(a.gate)
    specs = expert_specs(gate.experts)
    categories = categories_of(test)
    problem = SelectionProblem.from_specs(specs, categories, t_agg_s=0.0)
    ks = _parse_k(a.top_k)
    rows, checks, ev, energies, levels = run(
        gate,
        val,
        test,
        problem,
        ks,
        a.energies,
        None if a.delays is None else _parse_delays(a.delays),
        a.draws,
        a.seed,
    )
    machine = f"{cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}"
    result = {
        "machine": machine,
        "config": {
            "data": str(a.data),
            "gate": str(a.gate),
            "ks": [k_label(k) for k in ks],
            "energies": energies,
            "delays": levels,
            "delay_labels": [delay_label(problem, d) for d in levels],
            "draws": a.draws,
            "seed": a.seed,
            "val_prompts": len(val),
            "test_prompts": len(test),
            "test_chars_per_prompt": float(test.chars.sum()) / len(test),
        },
        "problem": {
            "experts": list(problem.experts),
            "devices": [s.device.name for s in specs],
            "energy_j": list(problem.energy_j),
            "delay_s": {c: list(d) for c, d in problem.delay_s},
            "worst_delay_s": worst_delay(problem),
            "t_agg_s": problem.t_agg_s,
            "categories": [
                {
                    "name": c.name,
                    "prompt_tokens": c.prompt_tokens,
                    "output_tokens": c.output_tokens,
                    "weight": w,
                }
                for c, w in categories.items()
            ],
        },
        "checks": asdict(checks),
        "references": references(ev, ks),
    }
    result["discussion"] = discussion(rows, result)
    result["wall_s"] = time.perf_counter() - start
    a.out.mkdir(parents=True, exist_ok=True)
    plot(rows, result, a.out / "router_quality.png")
    result["wall_s"] = time.perf_counter() - start
    md = render(result, rows, [*served_sections(splits, a.out, a.data), *extra_sections])
    (a.out / "router.md").write_text(md)
    # one row per line keeps the file small and diffable
    head = json.dumps({**result, "rows": "ROWS"}, indent=1)
    body = "[\n" + ",\n".join(json.dumps(asdict(r)) for r in rows) + "\n]"
    (a.out / "router.json").write_text(head.replace('"ROWS"', body) + "\n")
    print(md)
    print(
        f"delay budgets: {'; '.join(result['config']['delay_labels'])}\n"
        f"brute-force mismatches: {checks.bf_mismatches} (hull), {checks.raw_mismatches} (raw) "
        f"over {checks.points} points; MoE² worse on val than single/greedy: "
        f"{checks.worse_than_single}/{checks.worse_than_greedy}\n"
        f"wall {time.perf_counter() - start:.1f} s"
    )
    if checks.failed():
        raise SystemExit("MoE² disagrees with brute force or loses to a baseline on val")
    return result


if __name__ == "__main__":
    main()
