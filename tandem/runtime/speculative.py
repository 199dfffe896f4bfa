"""Drafts and their verification: the lossless collaborative mode's two halves.

The edge proposes a token (a *draft*) where its exit head is confident and keeps going;
the model that owns the full depth checks it later against its own next-token
distribution `p` (the cloud, in `--collab speculative`).

- Greedy: a draft is accepted iff it is the argmax of `p`; otherwise the argmax replaces
  it. The output equals full-depth greedy decoding exactly.
- Sampling: the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al.
  2023). A draft x drawn from the draft distribution q is accepted with probability
  min(1, p(x) / q(x)); on rejection the replacement is drawn from max(0, p - q),
  renormalised. Every emitted token is then distributed exactly as p, whatever q is.
  q is kept small on the wire: the draft is drawn from the head's `top_k` most likely
  tokens, renormalised, and that sparse q travels with the draft.

`p` is the target sampler's distribution: temperature and top_p applied, as `Sampler`
samples them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.runtime.decoder import StepResult
from tandem.runtime.sampling import Sampler, SamplingParams, nucleus, tempered

DRAFT_TOP_K = 16


@dataclass(frozen=True)
class Draft:
    """The edge's proposal for the token after `position`. `q_ids`/`q_probs`: the sparse
    draft distribution it was drawn from (empty when greedy)."""

    position: int
    token: int
    q_ids: tuple[int, ...] = ()
    q_probs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Speculation:
    """What a speculative message carries besides hidden states: the sender's epoch (the
    number of rollbacks it has seen), its sampling parameters and its new drafts."""

    epoch: int
    params: SamplingParams
    drafts: tuple[Draft, ...] = ()


@dataclass(frozen=True)
class Rollback:
    """The draft after `position` was rejected; `token` replaced it."""

    position: int
    token: int
    prob: float


@dataclass(frozen=True)
class Verdict:
    """The verifier's state after a call: rows run so far (`checked`: every draft after a
    row before it was accepted), its epoch, and the rollback that started that epoch."""

    epoch: int
    checked: int
    rollback: Rollback | None = None


@dataclass(frozen=True)
class Judgement:
    token: int  # the token after the draft's position: the draft itself, or its replacement
    prob: float  # p(token)
    accepted: bool


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """p over the vocabulary for one row of logits: temperature, then top_p, normalised."""
    probs = tempered(logits.float(), params.temperature)
    if params.top_p < 1.0:
        sorted_p, idx = nucleus(probs, params.top_p)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        probs /= probs.sum()
    return probs


def make_draft(
    position: int, step: StepResult, sampler: Sampler, top_k: int = DRAFT_TOP_K
) -> Draft:
    """The edge's draft after `position` from a step's (head or full) logits."""
    ids = None if step.shortlist is None else step.shortlist.cpu()
    logits = step.logits.detach().float().cpu()  # the sampler's generator lives on the CPU
    if sampler.params.greedy:
        idx = int(logits.max(-1).indices)
        return Draft(position, int(ids[idx]) if ids is not None else idx)
    probs = target_distribution(logits, sampler.params)
    k = min(top_k, int((probs > 0).sum()))
    q, idx = torch.topk(probs, k)
    q = q / q.sum()
    choice = int(idx[int(torch.multinomial(q, 1, generator=sampler.generator))])
    vocab = idx if ids is None else ids[idx]
    token = choice if ids is None else int(ids[choice])
    return Draft(position, token, tuple(int(i) for i in vocab), tuple(float(x) for x in q))


def judge(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> Judgement:
    """Accept or replace `draft` given the target's logits for its position."""
    logits = logits.detach().float().cpu()  # the sampler's generator lives on the CPU
    if sampler.params.greedy:
        top = logits.float().max(-1)
        token = int(top.indices)
        prob = float(torch.exp(top.values - torch.logsumexp(logits.float(), -1)))
        return Judgement(token, prob, token == draft.token)
    p = target_distribution(logits, sampler.params)
    if not draft.q_ids:
        raise ValueError("a sampled draft must carry its draft distribution (q_ids, q_probs)")
    q = torch.zeros_like(p)
    q[torch.tensor(draft.q_ids)] = torch.tensor(draft.q_probs, dtype=p.dtype)
    px, qx = float(p[draft.token]), float(q[draft.token])
    if qx <= 0:
        raise ValueError(f"draft token {draft.token} is outside its own draft distribution")
    u = float(torch.rand((), generator=sampler.generator))
    if u < min(1.0, px / qx):
        return Judgement(draft.token, px, True)
    residual = (p - q).clamp_min(0)
    total = float(residual.sum())
    if total <= 0:  # p == q up to rounding: every draft would have been accepted
        return Judgement(draft.token, px, True)
    token = int(torch.multinomial(residual / total, 1, generator=sampler.generator))
    return Judgement(token, float(p[token]), False)
