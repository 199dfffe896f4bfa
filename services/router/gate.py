"""The MoE² gate: a softmax over experts from prompt features, renormalised over any subset.

Logits ``z(x) = W phi(x) + b`` (or a 1-hidden-layer MLP), with ``phi`` standardised by the
training set's mean and std. Restricted to a subset S the weights are
``g_{S,n}(x) = exp(z_n) / sum_{m in S} exp(z_m)``; with top-k only the k largest logits in S
keep weight. The sequence-level mixture is ``p_S(y|x) = sum_n g_{S,n}(x) exp(-NLL_n(y|x))``
and the loss is ``-log p_S`` summed over prompts, divided by their characters, in bits.

The gate is trained once, on all experts (papers.md 1.2, P1); the coarse level then only
masks its logits. `python -m services.router.gate` trains it on the cached gate data
(`make gate-data`), saves it to ``artifacts/gate/gate.pt`` and writes
``docs/bench/gate.md`` with the optimality-preserving and monotonicity checks (papers.md 1.4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.router.gate_data import DEFAULT_PATH, GateData, load
from services.router.safe_top1 import SafeTop1

ARTIFACT = Path("artifacts/gate/gate.pt")
SUBSET_LOSSES = Path("artifacts/gate/subset_loss.json")
REPORT = Path("docs/bench/gate.md")
LN2 = math.log(2)


@dataclass(frozen=True)
class GateConfig:
    """Training recipe. ``pca``: project the standardised features onto their top principal
    components on the training set (0: none); with ~100 training prompts the raw 576 dims
    overfit at once. The last layer starts at zero, i.e. at the uniform gate."""

    pca: int = 8
    hidden: int = 0  # 0: linear gate
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 0.0
    seed: int = 0


class Gate(nn.Module):
    def __init__(
        self,
        experts: Sequence[str],
        mean: np.ndarray,
        std: np.ndarray,
        hidden: int = 0,
        proj: np.ndarray | None = None,
    ) -> None:
        """``proj`` [k, D]: a fixed projection of the standardised features (PCA)."""
        super().__init__()
        self.experts = tuple(experts)
        self.hidden = hidden
        dim, n = mean.shape[0], len(self.experts)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        proj_t = torch.empty(0, dim) if proj is None else torch.as_tensor(proj)
        self.register_buffer("proj", proj_t.float())
        dim = proj_t.shape[0] or dim
        self.net = (
            nn.Linear(dim, n)
            if hidden == 0
            else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n))
        )
        # The served top-1 pick (safe_top1.SafeTop1), fitted beside the mixture gate; None:
        # top-1 is the softmax's argmax.
        self.safe: SafeTop1 | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.std
        if self.proj.shape[0]:
            z = z @ self.proj.T
        return self.net(z)

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Gating logits ``z(x)``, [P, N] (or [N] for one feature vector)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        with torch.no_grad():
            return self(x).numpy()

    def weights(
        self,
        features: np.ndarray | torch.Tensor,
        subset: Iterable[str] | None = None,
        top_k: int | None = None,
    ) -> np.ndarray:
        """``g_S(x)`` (zero outside S and outside the top-k), [P, N]."""
        logits = torch.as_tensor(self.scores(features))
        return masked_log_weights(logits, self.mask(subset), top_k).exp().numpy()

    def mask(self, subset: Iterable[str] | None) -> torch.Tensor:
        if subset is None:
            return torch.ones(len(self.experts), dtype=torch.bool)
        names = set(subset)
        unknown = names - set(self.experts)
        if unknown:
            raise KeyError(f"unknown experts {sorted(unknown)}; gate has {self.experts}")
        if not names:
            raise ValueError("empty expert subset")
        return torch.tensor([e in names for e in self.experts])

    def top1(self, features: np.ndarray, subset: Sequence[str]) -> str:
        """The expert top-1 routing serves for one prompt ([D] features) within S: the safe
        router's pick where one is fitted for S, else the softmax's argmax in S."""
        key = tuple(e for e in self.experts if e in set(subset))
        if self.safe is not None and key in self.safe.priors:
            f = np.atleast_2d(features)
            return self.safe.choose(f, key, self.scores(f) if self.safe.mode == "gate" else None)[0]
        w = self.weights(np.atleast_2d(features), key)[0]
        return self.experts[int(w.argmax())]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"experts": list(self.experts), "hidden": self.hidden, "state": self.state_dict()}
        if self.safe is not None:
            blob["safe"] = json.dumps(self.safe.to_state())
        torch.save(blob, path)

    @staticmethod
    def load(path: Path) -> Gate:
        blob = torch.load(path, weights_only=True)
        state = blob["state"]
        proj = state["proj"].numpy() if state["proj"].shape[0] else None
        gate = Gate(
            blob["experts"], state["mean"].numpy(), state["std"].numpy(), blob["hidden"], proj
        )
        gate.load_state_dict(state)
        if "safe" in blob:
            gate.safe = SafeTop1.from_state(json.loads(blob["safe"]))
        return gate.eval()


def masked_log_weights(
    logits: torch.Tensor, mask: torch.Tensor, top_k: int | None = None
) -> torch.Tensor:
    """log g_S: log-softmax of the logits over the experts in ``mask`` (or only the top-k
    of them); -inf elsewhere. logits [P, N], mask [N] bool."""
    z = logits.masked_fill(~mask, -math.inf)
    if top_k is not None and top_k < int(mask.sum()):
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    return torch.log_softmax(z, dim=-1)


def served_log_weights(
    gate: Gate,
    features: np.ndarray,
    logits: torch.Tensor,
    mask: torch.Tensor,
    top_k: int | None = None,
) -> torch.Tensor:
    """log g_S as the router serves it: with top_k == 1 and a safe router fitted for S
    (`Gate.safe`), all weight on its pick per row (`SafeTop1.choose`, what `Gate.top1`
    serves); otherwise `masked_log_weights`. features [P, D], logits [P, N], mask [N]."""
    log_w = masked_log_weights(logits, mask, top_k)
    key = tuple(e for e, m in zip(gate.experts, mask.tolist(), strict=True) if m)
    if top_k != 1 or gate.safe is None or len(key) < 2 or key not in gate.safe.priors:
        return log_w
    z = logits.numpy() if gate.safe.mode == "gate" else None
    picks = gate.safe.choose(np.asarray(features), key, z)
    idx = torch.tensor([gate.experts.index(e) for e in picks])
    out = torch.full_like(log_w, -math.inf)
    out[torch.arange(len(idx)), idx] = 0.0
    return out


def mixture_nll(log_w: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
    """Per-prompt ``-log sum_n g_n exp(-NLL_n)`` in nats, [P]."""
    return -torch.logsumexp(log_w - nll, dim=-1)


def _tensors(data: GateData) -> tuple[torch.Tensor, torch.Tensor, float]:
    return (
        torch.as_tensor(data.features, dtype=torch.float32),
        torch.as_tensor(data.nll, dtype=torch.float64),
        float(data.chars.sum()),
    )


def mixture_loss(
    gate: Gate, data: GateData, subset: Iterable[str] | None = None, top_k: int | None = None
) -> float:
    """L(S, theta) in bits per character of the gated mixture over ``subset`` (all experts
    when None), optionally top-k within S; top-1 is the served pick (`served_log_weights`:
    the safe router's where the gate has one for S)."""
    _check_experts(gate, data)
    x, nll, chars = _tensors(data)
    with torch.no_grad():
        log_w = served_log_weights(gate, data.features, gate(x).double(), gate.mask(subset), top_k)
        return float(mixture_nll(log_w, nll).sum()) / chars / LN2


def uniform_loss(data: GateData, subset: Iterable[str] | None = None) -> float:
    """Bits/char of the equal-weight mixture over ``subset``."""
    names = set(data.experts if subset is None else subset)
    idx = [i for i, e in enumerate(data.experts) if e in names]
    nll = torch.as_tensor(data.nll[:, idx], dtype=torch.float64)
    log_w = torch.full_like(nll, -math.log(len(idx)))
    return float(mixture_nll(log_w, nll).sum()) / float(data.chars.sum()) / LN2


def oracle_loss(data: GateData, subset: Iterable[str] | None = None) -> float:
    """Bits/char when each prompt goes to its best expert in ``subset`` (a lower bound)."""
    names = set(data.experts if subset is None else subset)
    idx = [i for i, e in enumerate(data.experts) if e in names]
    return float(data.nll[:, idx].min(1).sum()) / float(data.chars.sum()) / LN2


def train_gate(
    data: GateData,
    experts_subset: Iterable[str] | None = None,
    seed: int = 0,
    config: GateConfig = GateConfig(),
    val: GateData | None = None,
) -> Gate:
    """Fit the gate by minimising the gated mixture's bits/char over ``experts_subset``
    (all experts when None) with full-batch AdamW, starting from the uniform gate. With
    ``val`` the step with the lowest validation loss is kept (early stopping). ``data`` may
    hold NaN losses (experts not scored on a prompt); ``val`` must not."""
    torch.manual_seed(seed)
    mean = data.features.mean(0)
    std = data.features.std(0) + 1e-6
    proj = None
    if config.pca:
        _, _, vt = np.linalg.svd((data.features - mean) / std, full_matrices=False)
        proj = vt[: config.pca]
    gate = Gate(data.experts, mean, std, config.hidden, proj)
    last = gate.net if config.hidden == 0 else gate.net[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mask = gate.mask(experts_subset)
    x, nll, chars = _tensors(data)
    # An expert not scored on a prompt (NaN: the gate data's budget ran out) is left out of
    # that prompt's softmax: the gate learns the relative logits of the experts it has.
    scored = torch.isfinite(nll)
    if not bool(scored.all()):
        mask = mask & scored
        nll = torch.where(scored, nll, torch.zeros_like(nll))
        if not bool(mask.any(1).all()):
            raise ValueError("a prompt has no scored expert in the subset")
    opt = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best: tuple[float, dict] | None = None
    for _ in range(config.steps):
        opt.zero_grad()
        log_w = masked_log_weights(gate(x).double(), mask)
        loss = mixture_nll(log_w, nll).sum() / chars / LN2
        loss.backward()
        opt.step()
        if val is not None:
            v = mixture_loss(gate, val, experts_subset)
            if best is None or v < best[0]:
                best = (v, {k: t.clone() for k, t in gate.state_dict().items()})
    if best is not None:
        gate.load_state_dict(best[1])
    return gate.eval()


def top1_cost_us(gate: Gate, features: np.ndarray, subset: Sequence[str]) -> dict[str, float]:
    """What `Gate.top1` (the served pick: the safe router's ridge, support check and
    threshold) costs per request on top of the feature pass: median and 90th percentile
    microseconds over ``features`` [P, D], one row at a time (after one warm-up)."""
    gate.top1(features[0], subset)
    times = []
    for f in features:
        t0 = time.perf_counter()
        gate.top1(f, subset)
        times.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": float(np.median(times)), "p90_us": float(np.quantile(times, 0.9))}


def _check_experts(gate: Gate, data: GateData) -> None:
    if gate.experts != data.experts:
        raise ValueError(f"gate experts {gate.experts} != data experts {data.experts}")


def subsets(experts: Sequence[str], min_size: int = 1) -> list[tuple[str, ...]]:
    return [
        s for r in range(min_size, len(experts) + 1) for s in itertools.combinations(experts, r)
    ]


@dataclass(frozen=True)
class PreservingRow:
    subset: tuple[str, ...]
    restricted: float  # L(S, theta*|S), bits/char on test
    retrained: float  # L(S, theta_S)
    uniform: float
    oracle: float


def optimality_preserving(
    gate: Gate, train: GateData, test: GateData, val: GateData | None, config: GateConfig
) -> list[PreservingRow]:
    """For every S with |S| >= 2: the full-set gate restricted to S against a gate retrained
    from scratch on S only (papers.md 1.4)."""
    rows = []
    for s in subsets(gate.experts, 2):
        retrained = train_gate(train, s, config.seed, config, val)
        rows.append(
            PreservingRow(
                s,
                mixture_loss(gate, test, s),
                mixture_loss(retrained, test, s),
                uniform_loss(test, s),
                oracle_loss(test, s),
            )
        )
    return rows


def monotonicity_violations(
    gate: Gate, data: GateData, top_k: int | None = None, tol: float = 0.0
) -> tuple[int, int, float]:
    """Count pairs S ⊂ S' (non-empty, proper) with L(S', theta*) > L(S, theta*) + tol.
    Returns (violations, pairs, worst increase in bits/char)."""
    loss = {s: mixture_loss(gate, data, s, top_k) for s in subsets(gate.experts)}
    bad, pairs, worst = 0, 0, 0.0
    for small, big in itertools.permutations(loss, 2):
        if len(small) < len(big) and set(small) <= set(big):
            pairs += 1
            worst = max(worst, loss[big] - loss[small])
            bad += loss[big] > loss[small] + tol
    return bad, pairs, worst


def report(
    splits: dict[str, GateData],
    gate: Gate,
    config: GateConfig,
    train_s: float,
    manifest: dict | None = None,
) -> str:
    """The markdown report (docs/bench/gate.md); ``manifest`` is gate_data's (timings)."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    experts = test.experts
    lines = [
        "# MoE² gate: trained once on all experts",
        "",
        "Generated by `python -m services.router.gate` from the cached gate data "
        "(`make gate-data`, `services/router/gate_data.py`). All numbers are bits per "
        "character of the reference continuation on the **test** split "
        f"({len(test)} prompts; train {len(train)}, val {len(val)}), lower is better.",
        "",
        f"Gate: {'linear' if config.hidden == 0 else f'MLP ({config.hidden} hidden)'} on "
        f"smollm2 mid-layer mean-pooled prompt states ({train.features.shape[1]} dims, "
        f"standardised, projected on their top {config.pca} principal components of the "
        f"train split), started at the uniform gate, AdamW lr {config.lr}, weight decay "
        f"{config.weight_decay}, {config.steps} full-batch steps, early-stopped on val; "
        f"training took {train_s:.1f}s.",
        "",
    ]
    if manifest is not None:
        sizes = manifest["sizes"]
        scored = manifest.get("scored", {})
        rates = ", ".join(
            f"{e} {t['rows'] / t['seconds']:.2f}"
            for e, t in manifest["timings"].items()
            if t.get("seconds")
        )
        short = [e for e, n in scored.items() if n < manifest.get("prompts", n)]
        cut = (
            " (the budgeted build, one thread at nice 19 on a shared 2-core host, ran out "
            f"before {', '.join(short)} finished)"
            if short
            else ""
        )
        lines += [
            f"Prompts: {manifest.get('prompts', '?')} in {len(manifest.get('domains', []))} "
            f"domains ({', '.join(manifest.get('domains', []))}), up to "
            f"{sizes.get('per_domain', '?')} per domain; raw text cut at a whitespace after "
            f"up to {sizes['prompt_chars']} characters, continuations (and chat answers) up "
            f"to {sizes['continuation_chars']} characters; seed {sizes['seed']}. Scored per "
            f"expert: {', '.join(f'{e} {n}' for e, n in scored.items())} prompts{cut}. "
            f"Rows/s of the last build run: {rates}.",
            "",
            "The tables below are on the test split's rows that every expert was scored "
            "on; the leave-one-domain-out section uses every row each subset has.",
            "",
        ]
    lines += [
        "## Experts and mixtures",
        "",
        "| | all | " + " | ".join(sorted(set(test.categories))) + " |",
        "|---|---|" + "---|" * len(set(test.categories)),
    ]
    cats = sorted(set(test.categories))

    def by_cat(d: GateData) -> list[GateData]:
        out = []
        for c in cats:
            idx = np.array([i for i, k in enumerate(d.categories) if k == c])
            out.append(
                GateData(d.experts, d.features[idx], d.nll[idx], d.chars[idx], (c,) * len(idx))
            )
        return out

    parts = [test, *by_cat(test)]
    for i, e in enumerate(experts):
        lines.append(f"| {e} | " + " | ".join(f"{p.bits_per_char()[i]:.3f}" for p in parts) + " |")
    single = test.bits_per_char()
    rows = [
        (
            "best single expert (" + experts[int(single.argmin())] + ")",
            lambda p: p.bits_per_char()[int(single.argmin())],
        ),
        ("uniform ensemble", lambda p: uniform_loss(p)),
        ("**gated mixture, all experts**", lambda p: mixture_loss(gate, p)),
        ("gated, top-1 (served: safe top-1)", lambda p: mixture_loss(gate, p, top_k=1)),
        ("gated, top-2", lambda p: mixture_loss(gate, p, top_k=2)),
        ("oracle (best expert per prompt)", lambda p: oracle_loss(p)),
    ]
    for name, fn in rows:
        lines.append(f"| {name} | " + " | ".join(f"{fn(p):.3f}" for p in parts) + " |")
    with torch.no_grad():
        logits = gate(torch.as_tensor(test.features)).double()
    served = served_log_weights(gate, test.features, logits, gate.mask(None), 1)
    top1 = np.bincount(served.argmax(1).numpy(), minlength=len(experts))
    lines += [
        "",
        "Top-1 routing share on test (the served safe top-1): "
        + ", ".join(f"{e} {c / len(test):.0%}" for e, c in zip(experts, top1, strict=True))
        + ".",
        "",
        "## Optimality-preserving check (papers.md 1.4)",
        "",
        "For every subset S with |S| >= 2: the full-set gate theta* with its logits masked to S, "
        "against a gate retrained from scratch on S only (same recipe, same seed).",
        "",
        "| S | L(S, theta*\\|S) | L(S, theta_S) | restricted - retrained "
        "| uniform on S | oracle on S |",
        "|---|---|---|---|---|---|",
    ]
    op = optimality_preserving(gate, train, test, val, config)
    for r in op:
        lines.append(
            f"| {', '.join(r.subset)} | {r.restricted:.3f} | {r.retrained:.3f} | "
            f"{r.restricted - r.retrained:+.3f} | {r.uniform:.3f} | {r.oracle:.3f} |"
        )
    gaps = np.array([r.restricted - r.retrained for r in op])
    lines += [
        "",
        f"Restricted minus retrained over the {len(op)} subsets: mean {gaps.mean():+.3f}, "
        f"max |gap| {np.abs(gaps).max():.3f} bits/char.",
        "",
        "## Monotonicity of L(S, theta*|S) as S grows",
        "",
        "Over all pairs S ⊂ S' of non-empty subsets; a violation is L(S') > L(S).",
        "",
        "| gate | violations / pairs | worst increase (bits/char) |",
        "|---|---|---|",
    ]
    for label, k in (("softmax over S", None), ("top-1 in S", 1), ("top-2 in S", 2)):
        bad, pairs, worst = monotonicity_violations(gate, test, k)
        lines.append(f"| {label} | {bad} / {pairs} | {max(worst, 0.0):.3f} |")
    headroom = math.log2(len(experts)) * len(test) / float(test.chars.sum())
    worst_op = max(op, key=lambda r: r.restricted - r.retrained)
    lines += [
        "",
        "## Notes",
        "",
        "- The mixture is sequence-level: `p_S(y|x) = sum_n g_n exp(-NLL_n)` over the whole "
        "continuation. Even uniform weights are within log2|S| bits per prompt of the "
        f"per-prompt oracle, here {headroom:.3f} bits/char for all {len(experts)} experts at "
        f"{float(test.chars.mean()):.0f} characters per continuation, so that is all the "
        "headroom a gate has over the uniform ensemble when all of S runs. Top-k, which runs "
        "fewer experts, needs the gate far more.",
        "- Restricting theta* is least faithful where theta* gives every member of S little "
        f"weight (largest gap: {', '.join(worst_op.subset)}, "
        f"{worst_op.restricted - worst_op.retrained:+.3f}): the training signal on the "
        "relative logits of experts the full gate never picks is weak. The coarse level "
        "should treat L(S, theta*|S) as an estimate there, or retrain per chosen S "
        "(it trains in about a second).",
        "- Monotonicity holds only approximately with a fixed theta* (papers.md 1.2 expects "
        "this): adding an expert the gate over-weights can raise the loss slightly. The exact "
        "solver's pruning assumes monotone f; the worst increase above is the size of the "
        "error that assumption can make here.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the MoE² gate and write its report.")
    ap.add_argument("--data", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--out", type=Path, default=ARTIFACT)
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--hidden", type=int, default=GateConfig.hidden)
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument(
        "--no-feature-cost", dest="feature_cost", action="store_false", help="skip the timing"
    )
    args = ap.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"no gate data at {args.data}; run `make gate-data` first")
    # Imported here: the planner imports this module, gate_lodo imports it.
    from services.router.gate_lodo import SUBSETS, lodo_report, pooled
    from services.router.planner import SubsetLossTable

    splits = load(args.data)
    complete = {k: v.complete() for k, v in splits.items()}
    config = GateConfig(hidden=args.hidden)
    t0 = time.perf_counter()
    gate = train_gate(splits["train"], None, config.seed, config, complete["val"])
    train_s = time.perf_counter() - t0
    # The served top-1: fitted on train + val (its threshold by inner leave-one-domain-out).
    fit = pooled({"train": splits["train"], "val": splits["val"]})
    t0 = time.perf_counter()
    gate.safe = SafeTop1.fit(
        fit.experts, fit.features, fit.nll, fit.chars, fit.categories, subsets(fit.experts, 2)
    )
    safe_s = time.perf_counter() - t0
    gate.save(args.out)
    SubsetLossTable.compute(gate, complete["val"]).save(args.out.with_name(SUBSET_LOSSES.name))
    manifest_path = args.data.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    text = report(complete, gate, config, train_s, manifest)
    lodo_md, summary = lodo_report(pooled(splits), draws=args.draws)
    # bench.router reuses these tables when the data is unchanged (they take minutes).
    summary["markdown"] = lodo_md
    summary["data"] = {"path": str(args.data), "mtime": args.data.stat().st_mtime}
    text += "\n" + "\n".join(lodo_md) + "\n"
    text += (
        f"\nThe served top-1 router saved in `{args.out}` (SafeTop1, fitted on train + val of "
        f"every domain in {safe_s:.1f}s): "
        + "; ".join(
            f"{', '.join(k)}: prior {gate.safe.priors[k]}, τ "
            + ("∞" if math.isinf(gate.safe.taus[k]) else f"{gate.safe.taus[k]:.3f}")
            for k in gate.safe.priors
        )
        + ".\n"
    )
    # The first reported subset the gate has (the edge-only set) with more than one expert.
    edge = next((s for s in SUBSETS if len(s) > 1 and set(s) <= set(gate.experts)), gate.experts)
    pick = top1_cost_us(gate, pooled(splits).features[::10][:200], edge)
    summary["top1_cost"] = pick
    text += (
        f"\nThe served top-1 pick itself (`Gate.top1` on S = {{{', '.join(edge)}}}: the safe "
        f"router's ridge, support check and threshold) costs {pick['median_us']:.0f} µs per "
        f"request (median; p90 {pick['p90_us']:.0f} µs) over 200 prompts' features.\n"
    )
    if args.feature_cost:
        from services.router.features import ModelFeaturizer, feature_cost_ms

        texts = list(pooled(splits).prompts)[:: max(1, len(pooled(splits)) // 40)][:40]
        lm = ModelFeaturizer.load().lm
        cost = feature_cost_ms(lm, texts)
        summary["feature_cost"] = cost
        n = lm.model.cfg.n_layers
        text += (
            f"\nThe gate's feature pass (smollm2, first {n // 2} of {n} layers, mean-pooled) "
            f"costs {cost['median_ms']:.0f} ms per request (median; p90 {cost['p90_ms']:.0f} "
            f"ms) over {cost['requests']} gate prompts one at a time on {cost['threads']} "
            "torch threads of this (shared, busy) machine.\n"
        )
    # k > 1 across tokenizers: the pick by the experts' prompt scores, where they are cached
    # (services.router.self_score_data), fitted on train + val like the safe top-1, and its
    # held-out evaluation (bench.router_self_score) when it was run on this very data.
    try:
        from services.router.self_score import DEFAULT_PICKS, fit_picks

        picks = fit_picks(args.data)
        if picks.picks:
            picks.save(args.out.with_name(DEFAULT_PICKS.name))
    except FileNotFoundError:
        pass
    own = args.report.with_name("router_self_score.json")
    blob = json.loads(own.read_text()) if own.exists() else {}
    if blob.get("data", {}).get("mtime") == summary["data"]["mtime"] and "markdown" in blob:
        text += "\n## k > 1 across tokenizers: the pick by prompt scores, leave one domain out\n\n"
        text += blob["markdown"] + "\n"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    args.report.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    print(f"gate: saved {args.out}, report {args.report}")


if __name__ == "__main__":
    main()
