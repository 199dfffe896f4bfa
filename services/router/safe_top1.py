"""Top-1 routing that is safe on text it never saw: route away from the best single expert of
S only when a calibrated margin says so, and only for prompts like those it was fitted on.

The softmax gate (`gate.Gate`) is trained for the sequence-level mixture; its argmax, served
as top-1, can be worse than always sending to the best single expert of S on text unlike
its training data. `SafeTop1` guards the served path:

- the **prior** of a subset S: its best single expert on the training data;
- a **margin** per prompt and expert: by default (mode "ridge") a ridge regression from the
  gate features (standardised, top principal components) to each expert's bits/char, the
  margin being the predicted gain over the prior; mode "gate" uses the mixture gate's
  log-weight margin ``z_n - z_prior``;
- a **support** check: a prompt whose features lie outside what the margin was fitted on
  (its residual off the training principal subspace above the ``support`` quantile of the
  training rows' residuals) is served by the prior: the regression is not trusted to
  extrapolate;
- a supported prompt goes to the expert with the largest margin over the prior if that
  margin exceeds the subset's **abstention threshold** tau_S, else to the prior;
- tau_S is fitted on the training domains only, by inner leave-one-domain-out: for each
  training domain the margin model and the support are refitted without it and route it;
  the threshold kept is the one with the lowest total loss among those that leave **no**
  inner held-out domain worse than the prior (``alpha`` 0.5: by its point estimate, the
  default; ``alpha`` < 0.5: only beyond the lower ``alpha`` quantile of its paired bootstrap,
  a looser check); tau = inf, "always the prior", always qualifies.

So a domain like none the gate trained on is routed only where it looks like the training
text and only as far as routing held up on every domain the threshold was checked on, and
otherwise served by the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

LN2 = math.log(2)


@dataclass(frozen=True)
class SafeTop1Config:
    pca: int = 16
    ridge: float = 1.0  # L2 weight, per unit of (character-weighted) sample mass
    quantiles: int = 40  # candidate thresholds: quantiles of the inner predicted gains
    min_inner_domains: int = 3  # fewer training domains: no inner check, always the prior
    # An inner held-out domain blocks a threshold when routing makes it worse than the prior:
    # alpha >= 0.5, by the point estimate; alpha < 0.5, only when the lower alpha quantile of
    # `draws` paired bootstrap resamples of the change is > 0 (worse beyond noise).
    alpha: float = 0.5
    draws: int = 200
    # Support: route only prompts whose residual off the training principal subspace is at
    # most this quantile of the training rows' residuals (1.0 or more: no check).
    support: float = 0.95
    seed: int = 0


RESIDUAL_FLOOR = 1e-9  # mean squared standardised residual that counts as on the subspace


@dataclass
class Support:
    """The standardised features' top principal subspace of a training set, and how far off
    it a prompt may lie (``limit``: mean squared residual per dimension) to count as like
    the training text."""

    mean: np.ndarray
    std: np.ndarray
    proj: np.ndarray  # [k, D]
    limit: float

    @staticmethod
    def fit(features: np.ndarray, cfg: SafeTop1Config) -> Support:
        x = np.asarray(features, dtype=np.float64)
        mean, std = x.mean(0), x.std(0) + 1e-6
        zs = (x - mean) / std
        k = min(cfg.pca, zs.shape[0] - 1, zs.shape[1])
        _, _, vt = np.linalg.svd(zs, full_matrices=False)
        out = Support(mean, std, vt[:k], math.inf)
        if cfg.support < 1.0:
            # floored: where the subspace spans the features, every residual is rounding
            # (~1e-30), and a quantile of rounding would cover a prompt by chance
            q = float(np.quantile(out.residual(x), cfg.support))
            out.limit = max(q, RESIDUAL_FLOOR)
        return out

    def project(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.proj.T

    def residual(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return ((z - (z @ self.proj.T) @ self.proj) ** 2).mean(1)

    def covers(self, features: np.ndarray) -> np.ndarray:
        """[P] bool: the prompt lies within the support."""
        if math.isinf(self.limit):
            return np.ones(np.atleast_2d(features).shape[0], bool)
        return self.residual(np.atleast_2d(features)) <= self.limit


@dataclass
class Regressor:
    """Ridge from the support's principal components to each expert's bits/char,
    [P, D] -> [P, N]."""

    basis: Support
    coef: np.ndarray  # [k + 1, N] (last row: bias)

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = self.basis.project(np.atleast_2d(features))
        return np.hstack([z, np.ones((z.shape[0], 1))]) @ self.coef

    @staticmethod
    def fit(
        features: np.ndarray,
        bpc: np.ndarray,
        weight: np.ndarray,
        cfg: SafeTop1Config,
        basis: Support | None = None,
    ) -> Regressor:
        """``bpc`` [P, N] may hold NaN (an expert not scored on a prompt): each expert's
        column is fitted on its own rows."""
        basis = basis or Support.fit(features, cfg)
        z = basis.project(features)
        z = np.hstack([z, np.ones((z.shape[0], 1))])
        k = z.shape[1] - 1
        coef = np.zeros((k + 1, bpc.shape[1]))
        reg = np.eye(k + 1)
        reg[-1, -1] = 0.0  # no penalty on the bias
        for n in range(bpc.shape[1]):
            ok = np.isfinite(bpc[:, n])
            w = weight[ok] / weight[ok].mean()
            zw = z[ok] * w[:, None]
            coef[:, n] = np.linalg.solve(
                zw.T @ z[ok] + cfg.ridge * ok.sum() ** 0.5 * reg, zw.T @ bpc[ok, n]
            )
        return Regressor(basis, coef)


def rates(nll: np.ndarray, chars: np.ndarray) -> np.ndarray:
    return nll / (chars[:, None] * LN2)


def route(
    pred: np.ndarray, prior: int, tau: float, supported: np.ndarray | None = None
) -> np.ndarray:
    """Per row, the column with the largest predicted gain over ``prior`` when that gain
    exceeds tau (and the row is ``supported``), else ``prior``. ``pred`` [P, |S|] predicted
    bits/char (or any cost, lower is better)."""
    gain = pred[:, [prior]] - pred
    best = gain.argmax(1)
    go = gain[np.arange(len(pred)), best] > tau
    if supported is not None:
        go &= supported
    return np.where(go, best, prior)


def served_nll(nll: np.ndarray, choice: np.ndarray) -> np.ndarray:
    return nll[np.arange(len(nll)), choice]


# A margin model fitted on training rows of one subset S: features -> [P, |S|] costs, lower
# is better (the ridge: predicted bits/char; the gate: minus its logits).
Costs = Callable[[np.ndarray], np.ndarray]
# (experts, features, nll, chars, domains, support) -> Costs
Fitter = Callable[
    [tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, Sequence[str], Support], Costs
]


def ridge_fitter(cfg: SafeTop1Config) -> Fitter:
    def fit(experts, features, nll, chars, domains, support):
        return Regressor.fit(features, rates(nll, chars), chars, cfg, support).predict

    return fit


def gate_fitter(gate_config=None) -> Fitter:
    """The mixture gate (`gate.train_gate`, retrained on S): cost = minus its logits, so the
    gain over the prior is the gate's log-weight margin log g_n - log g_prior."""

    def fit(experts, features, nll, chars, domains, support):
        from services.router.gate import GateConfig, train_gate
        from services.router.gate_data import GateData

        data = GateData(tuple(experts), features, nll, chars, tuple(domains))
        cfg = gate_config or GateConfig()
        gate = train_gate(data, None, cfg.seed, cfg)
        return lambda f: -gate.scores(f)

    return fit


def fit_threshold(
    features: np.ndarray,
    nll: np.ndarray,
    chars: np.ndarray,
    domains: Sequence[str],
    prior: int,
    cfg: SafeTop1Config,
    fitter: Fitter | None = None,
    experts: tuple[str, ...] = (),
    support_fit: Callable[[np.ndarray], Support] | None = None,
) -> tuple[float, dict]:
    """tau for one subset (columns of ``nll``) by inner leave-one-domain-out; returns it and
    what the check saw (per-domain change in bits/char at tau). ``support_fit``: how each
    inner fold's support is fitted on its training rows (default `Support.fit`; anything
    with ``covers``)."""
    fitter = fitter or ridge_fitter(cfg)
    experts = experts or tuple(str(i) for i in range(nll.shape[1]))
    doms = np.asarray(domains)
    names = sorted(set(domains))
    if len(names) < cfg.min_inner_domains:
        return math.inf, {"reason": f"{len(names)} training domains"}
    gains, covered, rows = [], [], []
    for d in names:
        held = doms == d
        support = (support_fit or (lambda x: Support.fit(x, cfg)))(features[~held])
        costs = fitter(
            experts, features[~held], nll[~held], chars[~held], list(doms[~held]), support
        )
        pred = costs(features[held])
        gains.append(pred[:, [prior]] - pred)
        covered.append(support.covers(features[held]))
        rows.append(np.flatnonzero(held))
    idx = np.concatenate(rows)
    gain = np.concatenate(gains)
    ok = np.concatenate(covered)
    best = gain.argmax(1)
    top = gain[np.arange(len(gain)), best]
    sub_nll, sub_chars, sub_dom = nll[idx], chars[idx], doms[idx]
    base = sub_nll[:, prior]
    live = (top > 0) & ok
    if not live.any():
        return math.inf, {"reason": "no positive margin on supported prompts"}
    cands = sorted(set(np.quantile(top[live], np.linspace(0, 1, cfg.quantiles)).tolist()))
    # Paired bootstrap per inner domain (the same resamples for every tau).
    rng = np.random.default_rng(cfg.seed)
    where = {d: np.flatnonzero(sub_dom == d) for d in names}
    draws = {d: rng.integers(0, len(w), size=(cfg.draws, len(w))) for d, w in where.items()}
    best_tau, best_total, seen = math.inf, 0.0, {}
    for tau in cands:
        served = np.where((top > tau) & ok, sub_nll[np.arange(len(idx)), best], base)
        diff = served - base
        delta, worst = {}, -math.inf
        for d, w in where.items():
            delta[d] = float(diff[w].sum() / sub_chars[w].sum() / LN2)
            if cfg.alpha >= 0.5:
                worst = max(worst, delta[d])
            else:
                boot = diff[w][draws[d]].sum(1) / sub_chars[w][draws[d]].sum(1) / LN2
                worst = max(worst, float(np.quantile(boot, cfg.alpha)))
        total = float(diff.sum())
        # Safe: no inner held-out domain is worse than the prior.
        if worst <= 0.0 and total < best_total:
            best_tau, best_total, seen = tau, total, delta
    return best_tau, {"inner_delta_bpc": seen, "candidates": len(cands)}


@dataclass
class SafeTop1:
    """Top-1 router over ``experts`` with a prior and a threshold per subset."""

    experts: tuple[str, ...]
    regressor: Regressor | None  # None: mode "gate" (the caller passes the gate's logits)
    support: Support | None = None  # None: every prompt is supported
    priors: dict[tuple[str, ...], str] = field(default_factory=dict)
    taus: dict[tuple[str, ...], float] = field(default_factory=dict)
    info: dict[tuple[str, ...], dict] = field(default_factory=dict)

    @staticmethod
    def fit(
        experts: Sequence[str],
        features: np.ndarray,
        nll: np.ndarray,
        chars: np.ndarray,
        domains: Sequence[str],
        subsets: Iterable[Sequence[str]],
        cfg: SafeTop1Config = SafeTop1Config(),
        mode: str = "ridge",
        gate_config=None,
    ) -> SafeTop1:
        """Fit on training rows (``nll`` [P, N] nats, NaN where not scored). For each
        subset, the prior and tau use only rows where every member of S was scored.
        ``mode`` "ridge": the ridge regression's predicted gain (stored here); "gate": the
        mixture gate's margin (thresholds fitted on gates retrained per inner fold; at
        serving the caller's gate gives the logits)."""
        experts = tuple(experts)
        support = Support.fit(features, cfg)
        if mode == "ridge":
            reg = Regressor.fit(features, rates(nll, chars), chars, cfg, support)
            out = SafeTop1(experts, reg, support)
            fitter = ridge_fitter(cfg)
        elif mode == "gate":
            out = SafeTop1(experts, None, support)
            fitter = gate_fitter(gate_config)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        for s in subsets:
            key = _key(experts, s)
            cols = [experts.index(e) for e in key]
            ok = np.isfinite(nll[:, cols]).all(1)
            sub = nll[ok][:, cols]
            prior = int((sub.sum(0) / chars[ok].sum()).argmin())
            doms = [d for d, keep in zip(domains, ok, strict=True) if keep]
            tau, info = fit_threshold(features[ok], sub, chars[ok], doms, prior, cfg, fitter, key)
            out.priors[key], out.taus[key], out.info[key] = key[prior], tau, info
        return out

    @property
    def mode(self) -> str:
        return "gate" if self.regressor is None else "ridge"

    def choose(
        self, features: np.ndarray, subset: Sequence[str], logits: np.ndarray | None = None
    ) -> list[str]:
        """The expert each row goes to. ``features`` [P, D] (or [D]); mode "gate" needs the
        gate's ``logits`` [P, len(experts)] (its experts, in its order)."""
        key = _key(self.experts, subset)
        if key not in self.priors:
            raise KeyError(f"no threshold fitted for subset {key}")
        x = np.atleast_2d(features)
        if len(key) == 1:
            return [key[0]] * x.shape[0]
        cols = [self.experts.index(e) for e in key]
        if self.regressor is None:
            if logits is None:
                raise ValueError("mode 'gate' needs the gate's logits")
            pred = -np.atleast_2d(logits)[:, cols]
        else:
            pred = self.regressor.predict(x)[:, cols]
        covered = None if self.support is None else self.support.covers(x)
        picks = route(pred, key.index(self.priors[key]), self.taus[key], covered)
        return [key[i] for i in picks]

    def to_state(self) -> dict:
        def basis(b: Support) -> dict:
            return {
                "mean": b.mean.tolist(),
                "std": b.std.tolist(),
                "proj": b.proj.tolist(),
                "limit": b.limit,
            }

        state: dict = {
            "experts": list(self.experts),
            "subsets": [
                {"subset": list(k), "prior": self.priors[k], "tau": self.taus[k]}
                for k in self.priors
            ],
        }
        if self.support is not None:
            state["support"] = basis(self.support)
        if self.regressor is not None:
            shared = self.regressor.basis is self.support  # stored once
            state["ridge"] = {
                "basis": "support" if shared else basis(self.regressor.basis),
                "coef": self.regressor.coef.tolist(),
            }
        return state

    @staticmethod
    def from_state(state: dict) -> SafeTop1:
        def basis(b: dict) -> Support:
            arrays = (np.asarray(b[k], dtype=np.float64) for k in ("mean", "std", "proj"))
            return Support(*arrays, float(b["limit"]))

        support = basis(state["support"]) if "support" in state else None
        reg = None
        if "ridge" in state:
            r = state["ridge"]
            b = support if r["basis"] == "support" else basis(r["basis"])
            reg = Regressor(b, np.asarray(r["coef"], dtype=np.float64))
        elif "coef" in state:  # a gate.pt saved before the support check
            b = Support(*(np.asarray(state[k]) for k in ("mean", "std", "proj")), math.inf)
            reg = Regressor(b, np.asarray(state["coef"]))
        out = SafeTop1(tuple(state["experts"]), reg, support)
        for s in state["subsets"]:
            key = tuple(s["subset"])
            out.priors[key], out.taus[key] = s["prior"], float(s["tau"])
        return out


def _key(experts: Sequence[str], subset: Sequence[str]) -> tuple[str, ...]:
    names = set(subset)
    unknown = names - set(experts)
    if unknown:
        raise KeyError(f"unknown experts {sorted(unknown)}")
    return tuple(e for e in experts if e in names)
