"""k > 1 across tokenizers: serve the answer of the expert predicted to continue best, from
the experts' own scores of the prompt.

A k > 1 request runs its k experts anyway, and each one's prefill says how well that expert
models the prompt (`self_score_data.SELF_FIELDS`: prompt log-likelihood and token count,
next-token entropies). How well an expert predicts the prompt is a strong, domain-robust
hint of how well it continues it. `SelfScoreTop1` turns that into the served pick with the
same safety construction as `safe_top1.SafeTop1`:

- **prior**: the best single expert of S on the training rows;
- **margin**: a ridge regression from the self-score features of S's experts (per expert:
  prompt bits/char, tokens per character, mean and last-position entropy, last top-1
  log-prob; standardised), optionally with the gate features' principal components, to each
  expert's bits/char of the continuation; the margin is the predicted gain over the prior;
- **support** (optional): a prompt whose self-score features lie far from the training rows
  (squared Mahalanobis distance above the ``support`` quantile of the training rows') is
  served by the prior;
- **threshold** tau_S, fitted by inner leave-one-domain-out on the training domains alone
  (`safe_top1.fit_threshold`): the lowest-loss tau that leaves no inner held-out domain
  worse than the prior.

The pick is then the answer of that expert, among the k that ran (the others' answers are
the failover). The features of the pick are what the experts return with their answer
(`PromptScore`); a request where an expert returned none falls back to the prior.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.router.safe_top1 import (
    LN2,
    SafeTop1Config,
    Support,
    fit_threshold,
    rates,
    route,
)

FEATURES_PER_EXPERT = 5


@dataclass(frozen=True)
class PromptScore:
    """One expert's scores of the prompt it was sent (its own tokenization, template
    included): ``prompt_nll`` nats over the prompt tokens after the first, the token count,
    the mean entropy (nats) of the next-token distributions at the positions predicting a
    prompt token, and the entropy and top-1 log-prob at the last position."""

    prompt_nll: float
    prompt_tokens: int
    mean_entropy: float
    last_entropy: float
    last_top1: float

    def as_array(self) -> np.ndarray:
        return np.array(
            [
                self.prompt_nll,
                self.prompt_tokens,
                self.mean_entropy,
                self.last_entropy,
                self.last_top1,
            ],
            dtype=np.float64,
        )


def self_features(scores: np.ndarray, prompt_chars: np.ndarray) -> np.ndarray:
    """[P, N, 5] raw self-scores (`PromptScore` order) and the prompt's length in
    characters (the text the router routes on) -> [P, N * 5] features: prompt bits/char,
    tokens per character, mean entropy, last entropy, last top-1 log-prob, per expert."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.maximum(np.asarray(prompt_chars, dtype=np.float64), 1.0)[:, None]
    f = np.stack([s[..., 0] / (c * LN2), s[..., 1] / c, s[..., 2], s[..., 3], s[..., 4]], axis=-1)
    return f.reshape(len(f), -1)


@dataclass(frozen=True)
class SelfScoreConfig:
    gate_pcs: int = 0  # principal components of the gate features added to the regression
    ridge: float = 1.0  # L2 weight per sqrt(rows), as SafeTop1
    support: float = 1.0  # quantile of training Mahalanobis distances; >= 1: no check
    safe: SafeTop1Config = field(default_factory=lambda: SafeTop1Config(support=1.0))


@dataclass
class SelfSupport:
    """Whitened self-score features of the training rows; ``limit``: the largest squared
    Mahalanobis distance (per dimension) a prompt may have to count as supported."""

    mean: np.ndarray
    whiten: np.ndarray  # [F, F]
    limit: float

    @staticmethod
    def fit(x: np.ndarray, quantile: float) -> SelfSupport:
        mean = x.mean(0)
        cov = np.cov(x - mean, rowvar=False) + 1e-6 * np.eye(x.shape[1])
        vals, vecs = np.linalg.eigh(cov)
        whiten = vecs / np.sqrt(np.maximum(vals, 1e-9))
        out = SelfSupport(mean, whiten, math.inf)
        if quantile < 1.0:
            out.limit = float(np.quantile(out.distance(x), quantile))
        return out

    def distance(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - self.mean) @ self.whiten
        return (z**2).mean(1)

    def covers(self, x: np.ndarray) -> np.ndarray:
        if math.isinf(self.limit):
            return np.ones(np.atleast_2d(x).shape[0], bool)
        return self.distance(x) <= self.limit


@dataclass
class SelfRegressor:
    """Ridge from [self features (standardised), gate PCs] to each expert's bits/char."""

    mean: np.ndarray
    std: np.ndarray
    gate_basis: Support | None
    coef: np.ndarray  # [F (+ k) + 1, N]

    def design(self, gate: np.ndarray | None, selff: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(selff) - self.mean) / self.std
        parts = [z]
        if self.gate_basis is not None:
            assert gate is not None
            parts.append(self.gate_basis.project(np.atleast_2d(gate)))
        parts.append(np.ones((z.shape[0], 1)))
        return np.hstack(parts)

    def predict(self, gate: np.ndarray | None, selff: np.ndarray) -> np.ndarray:
        return self.design(gate, selff) @ self.coef

    @staticmethod
    def fit(
        gate: np.ndarray | None,
        selff: np.ndarray,
        bpc: np.ndarray,
        weight: np.ndarray,
        cfg: SelfScoreConfig,
    ) -> SelfRegressor:
        mean, std = selff.mean(0), selff.std(0) + 1e-6
        basis = None
        if cfg.gate_pcs > 0 and gate is not None:
            basis = Support.fit(gate, SafeTop1Config(pca=cfg.gate_pcs, support=1.0))
        reg = SelfRegressor(mean, std, basis, np.zeros(0))
        x = reg.design(gate, selff)
        w = weight / weight.mean()
        pen = np.eye(x.shape[1])
        pen[-1, -1] = 0.0
        xw = x * w[:, None]
        reg.coef = np.linalg.solve(xw.T @ x + cfg.ridge * len(x) ** 0.5 * pen, xw.T @ bpc)
        return reg


def _split(x: np.ndarray, gate_dim: int) -> tuple[np.ndarray | None, np.ndarray]:
    return (x[:, :gate_dim] if gate_dim else None), x[:, gate_dim:]


def fitter(cfg: SelfScoreConfig, gate_dim: int):
    """A `safe_top1.Fitter` over rows [gate features (gate_dim) | self features]."""

    def fit(experts, features, nll, chars, domains, support):
        g, s = _split(features, gate_dim)
        reg = SelfRegressor.fit(g, s, rates(nll, chars), chars, cfg)
        return lambda x: reg.predict(*_split(x, gate_dim))

    return fit


def support_fitter(cfg: SelfScoreConfig, gate_dim: int):
    def fit(features: np.ndarray) -> SelfSupport:
        return _SplitSupport(SelfSupport.fit(_split(features, gate_dim)[1], cfg.support), gate_dim)

    return fit


@dataclass
class _SplitSupport:
    inner: SelfSupport
    gate_dim: int

    def covers(self, x: np.ndarray) -> np.ndarray:
        return self.inner.covers(_split(np.atleast_2d(x), self.gate_dim)[1])


@dataclass
class SelfScoreTop1:
    """The k > 1 pick for one expert set S (the k experts that ran, in a fixed order)."""

    experts: tuple[str, ...]
    prior: str
    tau: float
    regressor: SelfRegressor
    support: SelfSupport
    config: SelfScoreConfig
    info: dict = field(default_factory=dict)

    @staticmethod
    def fit(
        experts: Sequence[str],
        gate_features: np.ndarray,
        scores: np.ndarray,
        prompt_chars: np.ndarray,
        nll: np.ndarray,
        chars: np.ndarray,
        domains: Sequence[str],
        cfg: SelfScoreConfig = SelfScoreConfig(),
    ) -> SelfScoreTop1:
        """Fit on training rows: ``scores`` [P, |S|, 5] raw self-scores, ``nll`` [P, |S|]
        nats of the continuation (both in ``experts`` order), ``chars`` its length."""
        experts = tuple(experts)
        selff = self_features(scores, prompt_chars)
        gate_dim = gate_features.shape[1] if cfg.gate_pcs > 0 else 0
        x = np.hstack([gate_features, selff]) if gate_dim else selff
        prior = int((nll.sum(0) / chars.sum()).argmin())
        tau, info = fit_threshold(
            x,
            nll,
            chars,
            domains,
            prior,
            cfg.safe,
            fitter(cfg, gate_dim),
            experts,
            support_fit=support_fitter(cfg, gate_dim),
        )
        reg = SelfRegressor.fit(
            gate_features if gate_dim else None, selff, rates(nll, chars), chars, cfg
        )
        return SelfScoreTop1(
            experts, experts[prior], tau, reg, SelfSupport.fit(selff, cfg.support), cfg, info
        )

    def predict(self, gate_features: np.ndarray | None, selff: np.ndarray) -> np.ndarray:
        return self.regressor.predict(gate_features, selff)

    def choose_rows(
        self, gate_features: np.ndarray | None, scores: np.ndarray, prompt_chars: np.ndarray
    ) -> list[str]:
        """The expert per row: ``scores`` [P, |S|, 5] in ``experts`` order."""
        selff = self_features(scores, prompt_chars)
        pred = self.predict(gate_features, selff)
        picks = route(pred, self.experts.index(self.prior), self.tau, self.support.covers(selff))
        return [self.experts[i] for i in picks]

    def choose(
        self,
        scores: Mapping[str, PromptScore | None],
        prompt_chars: int,
        gate_features: np.ndarray | None = None,
    ) -> str:
        """The served pick for one request from what its experts returned; the prior when
        any expert of S gave no score (or the prior did not answer: then the expert with the
        lowest predicted bits/char among those that answered)."""
        if any(scores.get(e) is None for e in self.experts):
            return self.prior
        raw = np.stack([scores[e].as_array() for e in self.experts])[None]  # type: ignore[union-attr]
        g = None if gate_features is None else np.atleast_2d(gate_features)
        return self.choose_rows(g, raw, np.array([prompt_chars]))[0]

    def to_state(self) -> dict:
        r = self.regressor
        return {
            "experts": list(self.experts),
            "prior": self.prior,
            "tau": self.tau,
            "config": {
                "gate_pcs": self.config.gate_pcs,
                "ridge": self.config.ridge,
                "support": self.config.support,
            },
            "mean": r.mean.tolist(),
            "std": r.std.tolist(),
            "gate_basis": None
            if r.gate_basis is None
            else {
                "mean": r.gate_basis.mean.tolist(),
                "std": r.gate_basis.std.tolist(),
                "proj": r.gate_basis.proj.tolist(),
            },
            "coef": r.coef.tolist(),
            "support": {
                "mean": self.support.mean.tolist(),
                "whiten": self.support.whiten.tolist(),
                "limit": self.support.limit,
            },
        }

    @staticmethod
    def from_state(state: dict) -> SelfScoreTop1:
        a = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
        gb = state["gate_basis"]
        basis = (
            None if gb is None else Support(a(gb["mean"]), a(gb["std"]), a(gb["proj"]), math.inf)
        )
        reg = SelfRegressor(a(state["mean"]), a(state["std"]), basis, a(state["coef"]))
        sp = state["support"]
        support = SelfSupport(a(sp["mean"]), a(sp["whiten"]), float(sp["limit"]))
        c = state["config"]
        cfg = SelfScoreConfig(gate_pcs=c["gate_pcs"], ridge=c["ridge"], support=c["support"])
        return SelfScoreTop1(
            tuple(state["experts"]), state["prior"], float(state["tau"]), reg, support, cfg
        )


AGGREGATION = "self-score pick"
DEFAULT_PICKS = Path("artifacts/gate/self_score.json")


@dataclass
class SelfScorePicks:
    """The served picks, one per expert set (fitted on every domain's train + val rows);
    the router uses the one whose set equals the k experts it ran."""

    picks: dict[frozenset[str], SelfScoreTop1] = field(default_factory=dict)

    def get(self, experts: Sequence[str]) -> SelfScoreTop1 | None:
        return self.picks.get(frozenset(experts))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([p.to_state() for p in self.picks.values()]) + "\n")

    @staticmethod
    def load(path: Path) -> SelfScorePicks:
        out = SelfScorePicks()
        for state in json.loads(path.read_text()):
            pick = SelfScoreTop1.from_state(state)
            if pick.config.gate_pcs:
                raise ValueError("a served self-score pick must not need the gate's features")
            out.picks[frozenset(pick.experts)] = pick
        return out


def fit_picks(
    data_path: Path,
    cfg: SelfScoreConfig = SelfScoreConfig(),
    splits: Sequence[str] = ("train", "val"),
) -> SelfScorePicks:
    """Fit a pick for every set of two or more experts with self-scores."""
    from services.router.gate_data import load
    from services.router.gate_lodo import pooled, restrict
    from services.router.self_score_data import pooled_scores

    all_splits = load(data_path)
    data = pooled(all_splits)
    scores = pooled_scores(data.experts, data.prompts)
    names = list(all_splits)
    sizes = [len(all_splits[n]) for n in names]
    offsets = dict(zip(names, np.cumsum([0, *sizes[:-1]]), strict=True))
    keep = np.concatenate([np.arange(offsets[n], offsets[n] + len(all_splits[n])) for n in splits])
    have = [e for n, e in enumerate(data.experts) if np.isfinite(scores[keep, n]).all()]
    out = SelfScorePicks()
    for r in range(2, len(have) + 1):
        for s in itertools.combinations(have, r):
            cols = [data.experts.index(e) for e in s]
            rows = keep[np.isfinite(data.nll[keep][:, cols]).all(1)]
            d = restrict(data, s, rows)
            pchars = np.array([len(p) for p in d.prompts], dtype=float)
            out.picks[frozenset(s)] = SelfScoreTop1.fit(
                s, d.features, scores[rows][:, cols], pchars, d.nll, d.chars, d.categories, cfg
            )
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from services.router.gate_data import DEFAULT_PATH

    ap = argparse.ArgumentParser(description="Fit the served k > 1 self-score picks.")
    ap.add_argument("--data", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--out", type=Path, default=DEFAULT_PICKS)
    a = ap.parse_args(argv)
    picks = fit_picks(a.data)
    picks.save(a.out)
    for p in picks.picks.values():
        print(f"self-score pick {', '.join(p.experts)}: prior {p.prior}, tau {p.tau:.3f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
