"""Top-1 routing that is safe on text it never saw: route away from the best single expert of
S only when a calibrated margin says so.

The softmax gate (`gate.Gate`) is trained for the sequence-level mixture; its argmax is a
poor top-1 router off its training domains (it can be worse than always sending to the best
single expert of S). `SafeTop1` is trained for the served path instead:

- a ridge regression from the gate's features (standardised, top principal components) to
  each expert's bits per character on the prompt, weighted by the prompt's characters (the
  objective is total bits over total characters);
- the **prior** of a subset S: its best single expert on the training data;
- a prompt goes to the expert with the largest predicted gain over the prior, if that gain
  exceeds the subset's **abstention threshold** tau_S, else to the prior;
- tau_S is fitted on the training domains only, by inner leave-one-domain-out: for each
  training domain, the regression is refitted without it and routes it; the threshold kept is
  the one with the lowest total loss among those that leave **no** inner held-out domain
  worse than the prior (tau = inf, "always the prior", always qualifies).

So a domain like none the gate trained on is routed only where routing held up on every
domain the threshold was checked on, and otherwise served by the prior.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

LN2 = math.log(2)


@dataclass(frozen=True)
class SafeTop1Config:
    pca: int = 16
    ridge: float = 1.0  # L2 weight, per unit of (character-weighted) sample mass
    quantiles: int = 40  # candidate thresholds: quantiles of the inner predicted gains
    min_inner_domains: int = 3  # fewer training domains: no inner check, always the prior


@dataclass
class Regressor:
    """Ridge from features to each expert's bits/char, [P, D] -> [P, N]."""

    mean: np.ndarray
    std: np.ndarray
    proj: np.ndarray  # [k, D]
    coef: np.ndarray  # [k + 1, N] (last row: bias)

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.proj.T
        return np.hstack([z, np.ones((z.shape[0], 1))]) @ self.coef

    @staticmethod
    def fit(features: np.ndarray, bpc: np.ndarray, weight: np.ndarray, cfg: SafeTop1Config):
        """``bpc`` [P, N] may hold NaN (an expert not scored on a prompt): each expert's
        column is fitted on its own rows."""
        x = np.asarray(features, dtype=np.float64)
        mean, std = x.mean(0), x.std(0) + 1e-6
        zs = (x - mean) / std
        k = min(cfg.pca, zs.shape[0] - 1, zs.shape[1])
        _, _, vt = np.linalg.svd(zs, full_matrices=False)
        proj = vt[:k]
        z = np.hstack([zs @ proj.T, np.ones((zs.shape[0], 1))])
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
        return Regressor(mean, std, proj, coef)


def rates(nll: np.ndarray, chars: np.ndarray) -> np.ndarray:
    return nll / (chars[:, None] * LN2)


def route(pred: np.ndarray, prior: int, tau: float) -> np.ndarray:
    """Per row, the column with the largest predicted gain over ``prior`` when that gain
    exceeds tau, else ``prior``. ``pred`` [P, |S|] predicted bits/char."""
    gain = pred[:, [prior]] - pred
    best = gain.argmax(1)
    return np.where(gain[np.arange(len(pred)), best] > tau, best, prior)


def served_nll(nll: np.ndarray, choice: np.ndarray) -> np.ndarray:
    return nll[np.arange(len(nll)), choice]


def fit_threshold(
    features: np.ndarray,
    nll: np.ndarray,
    chars: np.ndarray,
    domains: Sequence[str],
    prior: int,
    cfg: SafeTop1Config,
) -> tuple[float, dict]:
    """tau for one subset (columns of ``nll``) by inner leave-one-domain-out; returns it and
    what the check saw (per-domain change in bits/char at tau)."""
    doms = np.asarray(domains)
    names = sorted(set(domains))
    if len(names) < cfg.min_inner_domains:
        return math.inf, {"reason": f"{len(names)} training domains"}
    gains, rows = [], []
    for d in names:
        held = doms == d
        reg = Regressor.fit(features[~held], rates(nll[~held], chars[~held]), chars[~held], cfg)
        pred = reg.predict(features[held])
        g = pred[:, [prior]] - pred
        gains.append(g)
        rows.append(np.flatnonzero(held))
    idx = np.concatenate(rows)
    gain = np.concatenate(gains)
    best = gain.argmax(1)
    top = gain[np.arange(len(gain)), best]
    sub_nll, sub_chars, sub_dom = nll[idx], chars[idx], doms[idx]
    base = sub_nll[:, prior]
    cands = sorted(set(np.quantile(top[top > 0], np.linspace(0, 1, cfg.quantiles)).tolist()))
    best_tau, best_total, seen = math.inf, 0.0, {}
    for tau in cands:
        served = np.where(top > tau, sub_nll[np.arange(len(idx)), best], base)
        delta = {
            d: float((served[sub_dom == d] - base[sub_dom == d]).sum())
            / float(sub_chars[sub_dom == d].sum())
            / LN2
            for d in names
        }
        total = float((served - base).sum())
        if max(delta.values()) <= 0.0 and total < best_total:
            best_tau, best_total, seen = tau, total, delta
    return best_tau, {"inner_delta_bpc": seen, "candidates": len(cands)}


@dataclass
class SafeTop1:
    """Top-1 router over ``experts`` with a prior and a threshold per subset."""

    experts: tuple[str, ...]
    regressor: Regressor
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
    ) -> SafeTop1:
        """Fit on training rows (``nll`` [P, N] nats, NaN where not scored). For each
        subset, the prior and tau use only rows where every member of S was scored."""
        experts = tuple(experts)
        out = SafeTop1(experts, Regressor.fit(features, rates(nll, chars), chars, cfg))
        for s in subsets:
            key = _key(experts, s)
            cols = [experts.index(e) for e in key]
            ok = np.isfinite(nll[:, cols]).all(1)
            sub = nll[ok][:, cols]
            prior = int((sub.sum(0) / chars[ok].sum()).argmin())
            doms = [d for d, keep in zip(domains, ok, strict=True) if keep]
            tau, info = fit_threshold(features[ok], sub, chars[ok], doms, prior, cfg)
            out.priors[key], out.taus[key], out.info[key] = key[prior], tau, info
        return out

    def choose(self, features: np.ndarray, subset: Sequence[str]) -> list[str]:
        """The expert each row goes to. ``features`` [P, D] (or [D])."""
        key = _key(self.experts, subset)
        if key not in self.priors:
            raise KeyError(f"no threshold fitted for subset {key}")
        if len(key) == 1:
            return [key[0]] * np.atleast_2d(features).shape[0]
        cols = [self.experts.index(e) for e in key]
        pred = self.regressor.predict(np.atleast_2d(features))[:, cols]
        picks = route(pred, key.index(self.priors[key]), self.taus[key])
        return [key[i] for i in picks]

    def to_state(self) -> dict:
        r = self.regressor
        return {
            "experts": list(self.experts),
            "mean": r.mean.tolist(),
            "std": r.std.tolist(),
            "proj": r.proj.tolist(),
            "coef": r.coef.tolist(),
            "subsets": [
                {"subset": list(k), "prior": self.priors[k], "tau": self.taus[k]}
                for k in self.priors
            ],
        }

    @staticmethod
    def from_state(state: dict) -> SafeTop1:
        reg = Regressor(*(np.asarray(state[k]) for k in ("mean", "std", "proj", "coef")))
        out = SafeTop1(tuple(state["experts"]), reg)
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
