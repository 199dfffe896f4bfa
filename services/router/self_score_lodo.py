"""Leave-one-domain-out evaluation of the k > 1 self-score pick (`self_score.SelfScoreTop1`)
beside what `gate_lodo` evaluates (prior, safe top-1, softmax top-1 = today's plurality
vote, sequence mixture, oracle), on the same folds and rows.

For each subset S of experts with self-scores and each domain D, the pick is fitted on the
other domains (prior, ridge, support, and tau by an inner leave-one-domain-out on those
domains alone) and routes D's prompts. Differences against the prior carry paired bootstrap
95% intervals (`gate_lodo.bootstrap_delta`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.router.gate_data import GateData
from services.router.gate_lodo import SubsetResult, bootstrap_delta, evaluate_subset, restrict
from services.router.self_score import SelfScoreConfig, SelfScoreTop1

METHOD = "self-score k>1"

# Ways to build the pick, all evaluated on the same folds; the first is the default served.
VARIANTS: tuple[tuple[str, SelfScoreConfig], ...] = (
    ("self-scores, point rule, no support check", SelfScoreConfig()),
    ("self-scores, point rule, support check (0.95)", SelfScoreConfig(support=0.95)),
    ("self-scores + gate PCs (16), point rule, no support check", SelfScoreConfig(gate_pcs=16)),
    (
        "self-scores + gate PCs (16), point rule, support check (0.95)",
        SelfScoreConfig(gate_pcs=16, support=0.95),
    ),
)
DEFAULT = VARIANTS[0][1]


@dataclass
class SelfFold:
    domain: str
    prior: str
    tau: float


def evaluate(
    data: GateData,
    scores: np.ndarray,
    subset: Sequence[str],
    configs: Sequence[tuple[str, SelfScoreConfig]] = VARIANTS[:1],
    base: SubsetResult | None = None,
) -> tuple[SubsetResult, dict[str, list[SelfFold]]]:
    """``scores`` [P, N, 5]: every row of ``data`` and every expert of ``data.experts`` (NaN
    where not scored). Adds one method per config to `gate_lodo.evaluate_subset`'s result
    (named by the config's label; the first also as `METHOD`)."""
    cols = [i for i, e in enumerate(data.experts) if e in set(subset)]
    rows = np.flatnonzero(
        np.isfinite(data.nll[:, cols]).all(1) & np.isfinite(scores[:, cols]).all((1, 2))
    )
    d = restrict(data, subset, rows)
    sc = scores[rows][:, cols]
    res = base or evaluate_subset(data, subset)
    if len(res.chars) != len(d) or tuple(res.domains) != tuple(d.categories):
        raise ValueError("self-scores do not cover the rows gate_lodo evaluated")
    doms = np.array(d.categories)
    pchars = np.array([len(p) for p in d.prompts], dtype=float)
    folds: dict[str, list[SelfFold]] = {}
    for n, (label, cfg) in enumerate(configs):
        out = np.zeros(len(d))
        picks_all: list[str] = [""] * len(d)
        folds[label] = []
        for dom in sorted(set(d.categories)):
            test, train = np.flatnonzero(doms == dom), np.flatnonzero(doms != dom)
            pick = SelfScoreTop1.fit(
                d.experts,
                d.features[train],
                sc[train],
                pchars[train],
                d.nll[train],
                d.chars[train],
                [d.categories[i] for i in train],
                cfg,
            )
            picks = pick.choose_rows(
                d.features[test] if cfg.gate_pcs else None, sc[test], pchars[test]
            )
            idx = [d.experts.index(p) for p in picks]
            out[test] = d.nll[test, idx]
            for t, p in zip(test, picks, strict=True):
                picks_all[t] = p
            folds[label].append(SelfFold(dom, pick.prior, pick.tau))
        res.nll[label] = out
        res.choice[label] = picks_all
        if n == 0:
            res.nll[METHOD], res.choice[METHOD] = out, picks_all
    return res, folds


def summarise(res: SubsetResult, method: str, draws: int = 2000) -> dict:
    """bits/char, Δ vs prior with CI, captured, per-domain Δ, domains worse (✗)."""
    prior, mine, oracle = res.bpc("prior"), res.bpc(method), res.bpc("oracle")
    per = {}
    for dom in sorted(set(res.domains)):
        m = res.mask(dom)
        per[dom] = {
            "prompts": int(m.sum()),
            "prior": res.bpc("prior", m),
            method: res.bpc(method, m),
            "oracle": res.bpc("oracle", m),
            "delta": bootstrap_delta(res, method, m, draws),
            "share": {
                e: float(np.mean([c == e for c, k in zip(res.choice[method], m, strict=True) if k]))
                for e in res.subset
            }
            if method in res.choice
            else {},
        }
    return {
        "bpc": mine,
        "prior": prior,
        "oracle": oracle,
        "delta": bootstrap_delta(res, method, draws=draws),
        "captured": (prior - mine) / prior,
        "captured_share_of_headroom": (prior - mine) / (prior - oracle) if prior > oracle else 0.0,
        "worse_domains": [d for d, v in per.items() if v["delta"][1] > 0],
        "share": {e: res.choice[method].count(e) / len(res.chars) for e in res.subset}
        if method in res.choice
        else {},
        "per_domain": per,
    }
