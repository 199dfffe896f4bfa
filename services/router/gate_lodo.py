"""Leave-one-domain-out evaluation of what the router serves.

For an expert subset S and each domain D of the gate data: train on every other domain, test
on D; the test rows of all folds together are the pooled held-out set (each row routed by a
model that never saw its domain). Per row it records the NLL of

- ``prior``: the best single expert of S on the training domains (what a router without a
  gate would serve: the baseline every difference is taken against);
- ``safe top-1``: `safe_top1.SafeTop1` (abstains to the prior unless the gate's margin
  exceeds a threshold fitted by inner leave-one-domain-out);
- ``softmax top-1``: the argmax of the softmax gate (`gate.train_gate`, today's recipe,
  retrained on S); also what k > 1 serves where neither token mixing nor a self-score pick
  (`self_score`) applies: the plurality vote (`aggregate`) returns the top-weight expert's
  answer whenever the k answers differ, as free-form answers do;
- ``sequence mixture``: the softmax gate's sequence-level mixture over S (all of S runs;
  not served by the router);
- references: the uniform mixture, the best single expert of S *in hindsight* on D, and
  the per-prompt oracle.

Differences against the prior come with paired bootstrap 95% intervals (prompts resampled
within each domain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.router.gate import GateConfig, masked_log_weights, mixture_nll, train_gate
from services.router.gate_data import GateData
from services.router.safe_top1 import SafeTop1, SafeTop1Config

LN2 = math.log(2)
METHODS = (
    "prior",
    "safe top-1",
    "softmax top-1",
    "sequence mixture",
    "uniform mixture",
    "hindsight single",
    "oracle",
)


def pooled(splits: dict[str, GateData]) -> GateData:
    """All splits as one set of rows (the domains, not the corpus splits, are held out)."""
    parts = list(splits.values())
    return GateData(
        parts[0].experts,
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.nll for p in parts]),
        np.concatenate([p.chars for p in parts]),
        tuple(c for p in parts for c in p.categories),
        tuple(t for p in parts for t in p.prompts) if all(p.prompts for p in parts) else (),
    )


def restrict(data: GateData, experts: Sequence[str], rows: np.ndarray | None = None) -> GateData:
    """The columns of ``experts`` (in data's order) and the given rows (default: every row
    where all of them were scored)."""
    cols = [i for i, e in enumerate(data.experts) if e in set(experts)]
    if rows is None:
        rows = np.flatnonzero(np.isfinite(data.nll[:, cols]).all(1))
    return GateData(
        tuple(data.experts[i] for i in cols),
        data.features[rows],
        data.nll[rows][:, cols],
        data.chars[rows],
        tuple(data.categories[i] for i in rows),
        tuple(data.prompts[i] for i in rows) if data.prompts else (),
    )


@dataclass
class Fold:
    domain: str
    prior: str
    tau: float
    rows: int


@dataclass
class SubsetResult:
    subset: tuple[str, ...]
    domains: tuple[str, ...]  # per row
    chars: np.ndarray
    nll: dict[str, np.ndarray]  # method -> [P] nats
    choice: dict[str, list[str]]  # top-1 methods -> expert per row
    folds: list[Fold] = field(default_factory=list)

    def bpc(self, method: str, mask: np.ndarray | None = None) -> float:
        m = np.ones(len(self.chars), bool) if mask is None else mask
        return float(self.nll[method][m].sum() / self.chars[m].sum() / LN2)

    def mask(self, domain: str) -> np.ndarray:
        return np.array([d == domain for d in self.domains])


def evaluate_subset(
    data: GateData,
    subset: Sequence[str],
    gate_config: GateConfig | None = None,
    safe_config: SafeTop1Config | None = None,
    mode: str = "ridge",
) -> SubsetResult:
    gate_config = gate_config or GateConfig()
    safe_config = safe_config or SafeTop1Config()
    d = restrict(data, subset)
    doms = np.array(d.categories)
    names = tuple(sorted(set(d.categories)))
    out = {m: np.zeros(len(d)) for m in METHODS}
    choice: dict[str, list[str]] = {"safe top-1": [""] * len(d), "softmax top-1": [""] * len(d)}
    folds = []
    for dom in names:
        test = np.flatnonzero(doms == dom)
        train = np.flatnonzero(doms != dom)
        tr = restrict(d, d.experts, train)
        prior = int((tr.nll.sum(0) / tr.chars.sum()).argmin())
        safe = SafeTop1.fit(
            d.experts,
            tr.features,
            tr.nll,
            tr.chars,
            tr.categories,
            [d.experts],
            safe_config,
            mode,
            gate_config,
        )
        gate = train_gate(tr, None, gate_config.seed, gate_config)
        picks = safe.choose(d.features[test], d.experts, gate.scores(d.features[test]))
        with torch.no_grad():
            logits = gate(torch.as_tensor(d.features[test])).double()
        nll_t = torch.as_tensor(d.nll[test], dtype=torch.float64)
        mix = mixture_nll(masked_log_weights(logits, torch.ones(len(d.experts), dtype=bool)), nll_t)
        uni = -torch.logsumexp(-nll_t - math.log(len(d.experts)), dim=-1)
        soft = logits.argmax(1).numpy()
        rows = d.nll[test]
        ar = np.arange(len(test))
        hind = int(rows.sum(0).argmin())
        out["prior"][test] = rows[:, prior]
        out["safe top-1"][test] = rows[ar, [d.experts.index(p) for p in picks]]
        out["softmax top-1"][test] = rows[ar, soft]
        out["sequence mixture"][test] = mix.numpy()
        out["uniform mixture"][test] = uni.numpy()
        out["hindsight single"][test] = rows[:, hind]
        out["oracle"][test] = rows.min(1)
        for i, t in enumerate(test):
            choice["safe top-1"][t] = picks[i]
            choice["softmax top-1"][t] = d.experts[soft[i]]
        folds.append(Fold(dom, d.experts[prior], safe.taus[d.experts], len(test)))
    return SubsetResult(d.experts, tuple(d.categories), d.chars, out, choice, folds)


def bootstrap_delta(
    res: SubsetResult,
    method: str,
    mask: np.ndarray | None = None,
    draws: int = 2000,
    seed: int = 0,
    base: str = "prior",
) -> tuple[float, float, float]:
    """bits/char(method) - bits/char(base) on the masked rows, with a paired bootstrap 95%
    interval (rows resampled within each domain)."""
    m = np.ones(len(res.chars), bool) if mask is None else mask
    idx = np.flatnonzero(m)
    a, b, c = res.nll[method][idx], res.nll[base][idx], res.chars[idx].astype(float)
    point = float((a.sum() - b.sum()) / c.sum() / LN2)
    rng = np.random.default_rng(seed)
    doms = np.array(res.domains)[idx]
    counts = np.zeros((draws, len(idx)))
    for dom in set(doms):
        where = np.flatnonzero(doms == dom)
        pick = rng.integers(0, len(where), size=(draws, len(where)))
        for j in range(draws):
            counts[j] += np.bincount(where[pick[j]], minlength=len(idx))
    deltas = (counts @ (a - b)) / (counts @ c) / LN2
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return point, float(lo), float(hi)


def _ci(x: tuple[float, float, float], scale: float = 1.0) -> str:
    p, lo, hi = (v * scale for v in x)
    return f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def render(results: Sequence[SubsetResult], draws: int = 2000) -> tuple[list[str], dict]:
    """Markdown lines and a JSON-able summary."""
    lines = [
        "| S | prompts | prior (best single of S on training domains) | safe top-1 "
        "| Δ safe − prior [95% CI] | softmax top-1 (= k>1 plurality vote) "
        "| Δ softmax − prior [95% CI] | sequence mixture | Δ mixture − prior [95% CI] "
        "| oracle | headroom | captured (of prior) | captured (of headroom) "
        "| left-out domains worse (✗) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict = {}
    for r in results:
        prior = r.bpc("prior")
        ds = bootstrap_delta(r, "safe top-1", draws=draws)
        dt = bootstrap_delta(r, "softmax top-1", draws=draws)
        dm = bootstrap_delta(r, "sequence mixture", draws=draws)
        oracle = r.bpc("oracle")
        headroom = (prior - oracle) / prior
        captured = (prior - r.bpc("safe top-1")) / prior
        share = captured / headroom if headroom > 0 else 0.0
        per_domain = {}
        for dom in sorted(set(r.domains)):
            m = r.mask(dom)
            per_domain[dom] = {
                "prompts": int(m.sum()),
                **{meth: r.bpc(meth, m) for meth in METHODS},
                "safe_delta": bootstrap_delta(r, "safe top-1", m, draws),
                "softmax_delta": bootstrap_delta(r, "softmax top-1", m, draws),
            }
        worse = [dom for dom, v in per_domain.items() if v["safe_delta"][1] > 0]
        lines.append(
            f"| {', '.join(r.subset)} | {len(r.chars)} | {prior:.3f} | "
            f"{r.bpc('safe top-1'):.3f} | {_ci(ds)} | {r.bpc('softmax top-1'):.3f} | "
            f"{_ci(dt)} | {r.bpc('sequence mixture'):.3f} | {_ci(dm)} | {oracle:.3f} | "
            f"{headroom:.1%} | {captured:+.1%} | {share:+.0%} | {', '.join(worse) or 'none'} |"
        )
        summary[", ".join(r.subset)] = {
            "prompts": len(r.chars),
            **{meth: r.bpc(meth) for meth in METHODS},
            "safe_delta": ds,
            "softmax_delta": dt,
            "mixture_delta": dm,
            "headroom": headroom,
            "captured": captured,
            "captured_share_of_headroom": share,
            "worse_domains": worse,
            "safe_share": {e: r.choice["safe top-1"].count(e) / len(r.chars) for e in r.subset},
            "softmax_share": {
                e: r.choice["softmax top-1"].count(e) / len(r.chars) for e in r.subset
            },
            "folds": [vars(f) for f in r.folds],
            "per_domain": per_domain,
        }
    return lines, summary


def domain_table(r: SubsetResult, summary: dict) -> list[str]:
    """Per left-out domain: prior, safe and softmax top-1 with intervals, oracle."""
    s = summary[", ".join(r.subset)]
    lines = [
        "| left-out domain | prompts | prior | τ | safe top-1 "
        "| Δ safe − prior [95% CI] | softmax top-1 | Δ softmax − prior [95% CI] "
        "| sequence mixture | oracle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    folds = {f.domain: f for f in r.folds}
    for dom, v in s["per_domain"].items():
        f = folds[dom]
        tau = "∞ (always prior)" if math.isinf(f.tau) else f"{f.tau:.3f}"
        flag = " ✗" if v["safe_delta"][1] > 0 else ""
        lines.append(
            f"| {dom} | {v['prompts']} | {v['prior']:.3f} ({f.prior}) | {tau} | "
            f"{v['safe top-1']:.3f} | {_ci(v['safe_delta'])}{flag} | {v['softmax top-1']:.3f} | "
            f"{_ci(v['softmax_delta'])} | {v['sequence mixture']:.3f} | {v['oracle']:.3f} |"
        )
    return lines


# Subsets evaluated, in report order: the edge-only set (what tight energy budgets leave),
# its pairs, the full set and the token-mixable pair. A subset is skipped when fewer than
# MIN_ROWS prompts (or 3 domains) have every member scored.
SUBSETS: tuple[tuple[str, ...], ...] = (
    ("smollm2", "gemma3", "qwen05"),
    ("smollm2", "gemma3"),
    ("smollm2", "qwen05"),
    ("gemma3", "qwen05"),
    ("smollm2", "gemma3", "qwen05", "qwen15"),
    ("qwen05", "qwen15"),
)
MIN_ROWS = 100
# Per-domain tables: every subset whose oracle headroom is at least this (the bar),
# and the full set.
DETAIL_HEADROOM = 0.05
# Other ways to pick the served top-1, evaluated on the same folds (the subsets with
# DETAIL_HEADROOM): what the default was chosen against.
VARIANTS: tuple[tuple[str, str, SafeTop1Config], ...] = (
    (
        "gate margin, bootstrap check (alpha 0.025), no support check (the previous default)",
        "gate",
        SafeTop1Config(alpha=0.025, support=1.0),
    ),
    (
        "ridge margin, bootstrap check (alpha 0.025), no support check",
        "ridge",
        SafeTop1Config(alpha=0.025, support=1.0),
    ),
    ("ridge margin, point rule, no support check", "ridge", SafeTop1Config(support=1.0)),
    ("ridge margin, point rule, support check (0.95): the default", "ridge", SafeTop1Config()),
)


def variants_report(
    data: GateData,
    subsets: Sequence[tuple[str, ...]],
    draws: int = 2000,
    gate_config: GateConfig | None = None,
) -> tuple[list[str], dict]:
    """`VARIANTS` of the served top-1 on ``subsets``, one line each: bits/char, Δ against the
    prior, captured, and the left-out domains it made worse beyond their interval."""
    lines = [
        "| variant | S | safe top-1 | Δ − prior [95% CI] | captured (of prior) "
        "| captured (of headroom) | left-out domains worse (✗) |",
        "|---|---|---|---|---|---|---|",
    ]
    out: dict = {}
    for name, mode, cfg in VARIANTS:
        for s in subsets:
            r = evaluate_subset(data, s, gate_config, cfg, mode)
            prior, oracle = r.bpc("prior"), r.bpc("oracle")
            cap = (prior - r.bpc("safe top-1")) / prior
            share = cap / ((prior - oracle) / prior) if prior > oracle else 0.0
            worse = [
                d
                for d in sorted(set(r.domains))
                if bootstrap_delta(r, "safe top-1", r.mask(d), draws)[1] > 0
            ]
            delta = bootstrap_delta(r, "safe top-1", draws=draws)
            lines.append(
                f"| {name} | {', '.join(s)} | {r.bpc('safe top-1'):.3f} | {_ci(delta)} | "
                f"{cap:+.1%} | {share:+.0%} | {', '.join(worse) or 'none'} |"
            )
            out.setdefault(name, {})[", ".join(s)] = {
                "safe top-1": r.bpc("safe top-1"),
                "delta": delta,
                "captured": cap,
                "captured_share_of_headroom": share,
                "worse_domains": worse,
            }
    return lines, out


def lodo_report(
    data: GateData,
    draws: int = 2000,
    variants: bool = True,
    gate_config: GateConfig | None = None,
) -> tuple[list[str], dict]:
    """The leave-one-domain-out section of docs/bench/gate.md, and its numbers."""
    results = []
    for s in SUBSETS:
        if not set(s) <= set(data.experts):
            continue
        d = restrict(data, s)
        if len(d) < MIN_ROWS or len(set(d.categories)) < 3:
            continue
        results.append(evaluate_subset(data, s, gate_config))
    table, summary = render(results, draws)
    lines = [
        "## Leave-one-domain-out: what the router serves, on text it never trained on",
        "",
        "For each subset S and each domain D: every gate is trained without D and routes D's "
        "prompts; the rows of all folds together are the held-out set (each routed by a model "
        "that never saw its domain). Bits/char of the reference continuation, lower is "
        "better. Δ is against the **prior**, the best single expert of S on the training "
        "domains (what a router without a gate serves), with a paired bootstrap 95% interval "
        f"({draws} resamples of the prompts within each domain).",
        "",
        "- **safe top-1** (served by `make gate`'s gate.pt; `safe_top1.SafeTop1`): a ridge "
        "regression from the gate features (standardised, top 16 principal components) to "
        "each expert's bits/char predicts the gain of every expert over the prior; a prompt "
        "goes to the expert with the largest predicted gain only if it exceeds a threshold τ "
        "**and** the prompt lies within the regression's support (its residual off the "
        "training features' principal subspace at most the 95th percentile of the training "
        "rows'), else to the prior. τ is fitted by an inner leave-one-domain-out on the "
        "training domains alone: the lowest-loss τ that leaves **no** inner held-out domain "
        "worse than the prior (point estimate; τ = ∞ if none). τ is in bits/char of "
        "predicted gain.",
        "- **softmax top-1**: the argmax of the mixture gate (today's recipe, retrained on S "
        "without D). It is also what k > 1 serves for an expert set that can neither be "
        "token-mixed nor has a self-score pick fitted: the gate-weighted plurality vote "
        "(`aggregate.weighted_vote`) returns the top-weight expert's answer whenever the k "
        "free-form answers differ. Where a pick is fitted (the edge experts' sets), k > 1 "
        "serves the self-score pick instead (its own section below / in router.md).",
        "- **sequence mixture**: the mixture gate's sequence-level mixture over S (every member "
        "of S runs; the router does not serve it; the token mixture, served where tokenizers "
        "match, is in the next section).",
        "- **oracle**: each prompt to its best expert of S; **headroom** = (prior − oracle) / "
        "prior; **captured (of prior)** = (prior − safe top-1) / prior, the relative "
        "reduction in bits/char (the issue's '3%' read as 3% of bits/char); **captured (of "
        "headroom)** = (prior − safe top-1) / (prior − oracle) (read as 3% of the headroom). "
        "**✗**: a left-out domain where safe top-1 is worse than the prior with the whole 95% "
        "interval above 0.",
        "",
        *table,
        "",
    ]
    by_subset = {r.subset: r for r in results}
    detail = [
        r.subset
        for r in results
        if summary[", ".join(r.subset)]["headroom"] >= DETAIL_HEADROOM
        or len(r.subset) == len(data.experts)
    ]
    for s in detail:
        r = by_subset[s]
        summ = summary[", ".join(s)]
        share = ", ".join(f"{e} {v:.0%}" for e, v in summ["safe_share"].items())
        soft = ", ".join(f"{e} {v:.0%}" for e, v in summ["softmax_share"].items())
        worse = [
            dom for dom, v in summ["per_domain"].items() if v["safe_delta"][1] > 0
        ]  # whole interval above 0
        lines += [
            f"### Per left-out domain, S = {{{', '.join(s)}}}",
            "",
            *domain_table(r, summary),
            "",
            f"Routing shares over the held-out rows: safe top-1 {share}; softmax top-1 {soft}. "
            f"Domains where safe top-1 is worse than the prior with the whole interval above 0 "
            f"(✗): {', '.join(worse) if worse else 'none'}.",
            "",
        ]
    if variants:
        chosen = [s for s in detail if summary[", ".join(s)]["headroom"] >= DETAIL_HEADROOM]
        var_lines, summary["variants"] = variants_report(data, chosen, draws, gate_config)
        safe_variants = [
            n
            for n, per in summary["variants"].items()
            if not any(v["worse_domains"] for v in per.values())
        ]
        lines += [
            "### How the served top-1 was chosen: the variants, on the same folds",
            "",
            "Each row is a complete leave-one-domain-out run of one way to pick the served "
            "top-1 (thresholds always fitted on the training domains alone), on the subsets "
            f"with at least {DETAIL_HEADROOM:.0%} headroom. The default was picked among these "
            "after seeing this table, so the table itself used the left-out domains to choose "
            "a method (four candidates); no threshold or weight was fitted on them. Variants "
            "that left no left-out domain worse on any of these subsets: "
            + (", ".join(f"*{n}*" for n in safe_variants) or "none")
            + ".",
            "",
            *var_lines,
            "",
        ]
    return lines, summary
