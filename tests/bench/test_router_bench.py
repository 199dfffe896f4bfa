"""`bench/router.py` (MoE² quality against budget) on synthetic gate data and a random gate:
no model_cache, no trained artifact. Checks what can fail: MoE² is exact on val (it equals
an independent enumeration and is never beaten there by best-single, greedy or random),
budgets below the cheapest expert are infeasible for every method, and the report is
written end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from bench import router as rb
from services.router.gate import Gate, GateConfig, mixture_loss, train_gate
from services.router.gate_data import GateData, save
from services.router.selection import SelectionProblem, top_k_energy

EXPERTS = ("smollm2", "gemma3", "qwen05", "qwen15")
CATS = ("fortunes", "stdlib", "wordnet")
# per-category base NLL (nats) of each expert: each cheap edge expert is the best on one
# category and the costly qwen15 second everywhere, so routing among the cheap experts (top-1)
# or mixing them beats every single expert, and the worst-case top-k energy (max over S rather
# than the sum) decides whether that trio fits a budget
BASE = {"fortunes": (34, 20, 34, 24), "stdlib": (34, 34, 20, 24), "wordnet": (20, 34, 34, 24)}


def synthetic(n: int, seed: int, dim: int = 6) -> GateData:
    rng = np.random.default_rng(seed)
    cats = tuple(CATS[i % 3] for i in range(n))
    centers = np.eye(3, dim) * 2
    feats = np.stack([centers[CATS.index(c)] for c in cats]) + 0.5 * rng.standard_normal((n, dim))
    nll = np.array([BASE[c] for c in cats], dtype=float) + rng.uniform(0, 8, (n, len(EXPERTS)))
    return GateData(EXPERTS, feats.astype(np.float32), nll, np.full(n, 40), cats)


def random_gate(data: GateData, seed: int = 0) -> Gate:
    """An untrained gate (random linear layer)."""
    torch.manual_seed(seed)
    gate = Gate(data.experts, data.features.mean(0), data.features.std(0) + 1e-6)
    return gate.eval()


def trained_gate(seed: int = 0) -> Gate:
    """A gate fitted on a synthetic train split (a fraction of a second)."""
    return train_gate(synthetic(60, 10 + seed), seed=seed, config=GateConfig(pca=0, steps=80))


@pytest.fixture(scope="module")
def setup():
    val, test = synthetic(30, 1), synthetic(30, 2)
    gate = trained_gate()
    problem = SelectionProblem.from_specs(
        rb.expert_specs(EXPERTS), rb.categories_of(test), t_agg_s=0.0
    )
    rows, checks, ev, energies, delays = rb.run(
        gate, val, test, problem, ks=(1, None), n_energies=9, draws=8
    )
    return rows, checks, ev, energies, delays


def _enumerate(ev: rb.Evaluator, budget, k) -> float | None:
    """Best feasible raw validation objective by plain enumeration (independent of the
    solver): the lowest val bits/char over every feasible non-empty subset."""
    energy_of = top_k_energy(ev.problem, k)
    best = None
    for r in range(1, len(EXPERTS) + 1):
        for combo in itertools.combinations(range(len(EXPERTS)), r):
            s = frozenset(EXPERTS[i] for i in combo)
            if budget.energy_j is not None and energy_of(s) > budget.energy_j:
                continue
            if any(
                max(d[i] for i in combo) > (budget.delay_for(c) or math.inf)
                for c, d in ev.problem.delay_s
            ):
                continue
            v = mixture_loss(ev.gate, ev.val, sorted(s), k)
            best = v if best is None else min(best, v)
    return best


def test_moe2_is_exact_on_val_and_never_beaten_there(setup):
    rows, checks, ev, energies, delays = setup
    assert checks.bf_mismatches == 0 and checks.raw_mismatches == 0
    assert checks.worse_than_single == 0 and checks.worse_than_greedy == 0
    assert checks.points == 2 * len(delays) * len(energies)
    by = {(r.top_k, r.delay_budget_s, r.energy_budget_j, r.method): r for r in rows}
    feasible = 0
    for k in (1, None):
        kl = rb.k_label(k)
        for delay in delays:
            for e in energies:
                m = by[(kl, delay, e, "moe2")]
                want = _enumerate(ev, rb.budget_of(ev.problem, e, delay), k)
                if want is None:
                    assert not m.feasible
                    continue
                feasible += 1
                assert m.feasible and m.val_bpc == pytest.approx(want, abs=1e-12)
                assert top_k_energy(ev.problem, k)(frozenset(m.subset)) <= e
                assert m.energy_worst_j <= e
                for other in ("best_single", "greedy", "random"):
                    o = by[(kl, delay, e, other)]
                    assert o.feasible  # feasible whenever MoE² is
                    assert m.val_bpc <= o.val_bpc + 1e-12, (other, kl, delay, e)
                # expected energy under top-k routing never exceeds the budgeted worst case
                assert m.energy_expected_j <= m.energy_worst_j + 1e-9
    assert feasible > 0
    # the synthetic instance is built so that mixing pays somewhere
    assert any(r.method == "moe2" and r.feasible and len(r.subset) > 1 for r in rows), (
        "MoE² never picked more than one expert"
    )


def test_budgets_below_the_cheapest_expert_are_infeasible(setup):
    rows, _, ev, energies, _ = setup
    assert energies[0] < min(ev.problem.energy_j) < energies[-1]
    assert energies[-1] > sum(ev.problem.energy_j)
    low = [r for r in rows if r.energy_budget_j == energies[0]]
    assert low and all(not r.feasible for r in low)
    assert all(r.test_bpc is None and r.subset == () for r in low)


def test_delay_levels_admit_different_sets(setup):
    _, _, ev, _, delays = setup
    assert delays[-1] is None
    worst = rb.worst_delay(ev.problem)
    admitted = [sum(d <= lv for d in worst) for lv in delays[:-1]]
    assert admitted == sorted(admitted) and len(set(admitted)) == len(admitted)
    assert admitted[0] >= 1 and admitted[-1] < len(EXPERTS)


def test_subset_stats_match_the_gate_math(setup):
    _, _, ev, _, _ = setup
    s = frozenset({"smollm2", "qwen05"})
    for k in (1, None):
        st = ev.stats(s, k)
        assert st.test_bpc == pytest.approx(mixture_loss(ev.gate, ev.test, sorted(s), k))
        chars = float(ev.test.chars.sum()) / len(ev.test)
        assert st.test_nats == pytest.approx(st.test_bpc * math.log(2) * chars)
        assert st.val_bpc == pytest.approx(mixture_loss(ev.gate, ev.val, sorted(s), k))
    full = ev.stats(s, None)
    assert full.energy_expected_j == pytest.approx(full.energy_worst_j)  # all of S runs


def test_random_gate_is_still_exact():
    val, test = synthetic(24, 1), synthetic(24, 2)
    problem = SelectionProblem.from_specs(
        rb.expert_specs(EXPERTS), rb.categories_of(test), t_agg_s=0.0
    )
    _, checks, *_ = rb.run(random_gate(val), val, test, problem, n_energies=7, draws=4)
    assert checks.feasible_points > 0 and not checks.failed()


def test_main_writes_the_report(tmp_path):
    splits = {"train": synthetic(12, 0), "val": synthetic(24, 1), "test": synthetic(24, 2)}
    data = tmp_path / "gate_data.npz"
    save(splits, {}, data)
    gate_path = tmp_path / "gate.pt"
    random_gate(splits["val"]).save(gate_path)
    out = tmp_path / "out"
    rb.main(
        [
            "--data",
            str(data),
            "--gate",
            str(gate_path),
            "--out",
            str(out),
            "--energies",
            "6",
            "--draws",
            "4",
        ],
        extra_sections=[("Router overhead", "appended by another bench")],
    )
    md = (out / "router.md").read_text()
    assert "modelled" in md and md.rstrip().endswith("appended by another bench")
    assert "## Router overhead" in md
    blob = json.loads((out / "router.json").read_text())
    assert blob["checks"]["bf_mismatches"] == 0
    assert len(blob["rows"]) == 2 * len(blob["config"]["delays"]) * 6 * len(rb.METHODS)
    assert (out / "router_quality.png").stat().st_size > 0
