"""Exit heads from self-distillation features: shortlist, soft targets, training, and the
CALM-style consistency classifier that makes tau read as the target agreement.

1. Shortlist: the K tokens that are most often the final layer's greedy token in the
   features (answer rows count double: they are what decoding exits), then the most
   frequent of the final layer's top-8, then ids; EOS ids first.
2. Targets [N, K + 1]: the final layer's top-8 probabilities renormalised, each on its
   shortlist class or on "other"; the head is distilled on them with train.train_head.
3. Consistency classifier: on the validation rows (prompts never used for fitting the
   adapter), a logistic regression predicts "the head's top token equals the final greedy
   token" from the head's own softmax statistics and its adapter feature (exit_head).
   Rows whose top class is "other" never exit and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.calibration.selfdistill import Features
from tandem.runtime.exit_head import ExitHead, ExitHeadConfig, confidence_stats


def choose_shortlist(feats: Features, k: int, vocab: int, eos_ids: Sequence[int]) -> torch.Tensor:
    weight = 1.0 + feats.is_answer.float()
    argmax_count = torch.zeros(vocab).index_add_(0, feats.final_argmax, weight)
    topk_count = torch.zeros(vocab).index_add_(
        0, feats.top_ids.reshape(-1), feats.top_p.reshape(-1).float()
    )
    eos = torch.zeros(vocab)
    eos[[e for e in eos_ids if 0 <= e < vocab]] = 1.0
    # lexicographic: eos, argmax count, top-k mass, then lower id first (stable sort)
    order = torch.arange(vocab)
    for key in (topk_count, argmax_count, eos):
        order = order[torch.argsort(-key[order], stable=True)]
    return order[: min(k, vocab)].clone()


@dataclass(frozen=True)
class SoftTargets:
    """[N, K + 1] targets kept sparse (each row's top-8 classes and their mass: 48 bytes a
    row, against 8 kB dense at K = 4096, so a million rows fit); rows are made dense on
    indexing, one batch at a time."""

    classes: torch.Tensor  # [N, TOP_K] int32, shortlist class or K ("other")
    probs: torch.Tensor  # [N, TOP_K] fp16, renormalised
    n_classes: int  # K + 1

    def __getitem__(self, idx) -> torch.Tensor:
        cls, p = self.classes[idx], self.probs[idx].float()
        out = torch.zeros(*cls.shape[:-1], self.n_classes)
        return out.scatter_add_(-1, cls.long(), p).half()

    def dense(self) -> torch.Tensor:
        return self[:]


def soft_targets(feats: Features, shortlist: torch.Tensor, vocab: int) -> SoftTargets:
    """The final top-8 probabilities renormalised, each on its shortlist class or "other"."""
    k = shortlist.shape[0]
    cls_of = torch.full((vocab,), k, dtype=torch.int32)
    cls_of[shortlist] = torch.arange(k, dtype=torch.int32)
    p = feats.top_p.float()
    return SoftTargets(cls_of[feats.top_ids], (p / p.sum(-1, keepdim=True)).half(), k + 1)


def split_by_prompt(
    seq_index: torch.Tensor, fractions: tuple[float, ...], seed: int
) -> list[torch.Tensor]:
    """Row indices per part, whole prompts per part: the first part gets what the
    `fractions` of the others leave (each at least one prompt)."""
    n = int(seq_index.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    part = torch.zeros(n, dtype=torch.long)
    start = 0
    for j, f in enumerate(fractions, start=1):
        k = max(1, round(n * f))
        part[perm[start : start + k]] = j
        start += k
    of_row = part[seq_index]
    return [(of_row == j).nonzero().squeeze(1) for j in range(len(fractions) + 1)]


def split_extended(
    seq_index: torch.Tensor,
    base_prompts: int,
    fractions: tuple[float, ...],
    extra_fractions: tuple[float, ...],
    seed: int,
) -> list[torch.Tensor]:
    """`split_by_prompt` for a cache extended with more prompts (tandem.calibration.extend):
    the first `base_prompts` prompts get exactly the parts `split_by_prompt(fractions)`
    gave them before the extension (so its test prompts stay the test prompts and results
    compare); the prompts after them are split by `extra_fractions` (a 0 fraction keeps
    that part to the base prompts) with their own permutation."""
    base = seq_index < base_prompts
    parts = split_by_prompt(seq_index[base], fractions, seed)
    base_rows = base.nonzero().squeeze(1)
    out = [base_rows[p] for p in parts]
    extra_rows = (~base).nonzero().squeeze(1)
    if extra_rows.numel() == 0:
        return out
    extra = seq_index[extra_rows] - base_prompts
    n = int(extra.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    part = torch.zeros(n, dtype=torch.long)
    start = 0
    for j, f in enumerate(extra_fractions, start=1):
        k = round(n * f)
        part[perm[start : start + k]] = j
        start += k
    of_row = part[extra]
    return [
        torch.cat([out[j], extra_rows[of_row == j]]).sort().values
        for j in range(len(extra_fractions) + 1)
    ]


def calibrated_copy(head: ExitHead) -> ExitHead:
    """The same head with a (zero-initialised) consistency classifier."""
    cfg = ExitHeadConfig(**{**vars(head.cfg), "calibrated": True})
    eps, unit = head.norm_out.eps, head.norm_out.unit_offset
    new = ExitHead(cfg, eps, unit)
    new.load_state_dict(head.state_dict(), strict=False)
    new.proj = head.proj
    return new.float()


@torch.no_grad()
def head_outputs(head: ExitHead, hidden: torch.Tensor, chunk: int = 2048):
    logits, us = [], []
    for h in hidden.split(chunk):
        lg, u = head.raw(h.float())
        logits.append(lg)
        us.append(u)
    return torch.cat(logits), torch.cat(us)


def fit_consistency(
    head: ExitHead, hidden: torch.Tensor, final_argmax: torch.Tensor, l2: float = 1e-3
) -> dict:
    """Fit head's classifier (in place) by logistic regression (LBFGS) on these rows."""
    logits, u = head_outputs(head, hidden)
    k = head.shortlist.shape[0]
    top = logits.argmax(-1)
    keep = top < k
    label = (head.shortlist[top.clamp(max=k - 1)] == final_argmax).float()[keep]
    stats, u = confidence_stats(logits)[keep], u[keep]
    ws = torch.zeros(stats.shape[1], requires_grad=True)
    wh = torch.zeros(u.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([ws, wh, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = stats @ ws + u @ wh + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, label)
        loss = loss + l2 * (wh.square().sum() + ws.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.conf_stats.copy_(ws)
        head.conf_hidden.copy_(wh)
        head.conf_bias.copy_(b)
        z = stats @ ws + u @ wh + b
        nll = float(torch.nn.functional.binary_cross_entropy_with_logits(z, label))
    return {"rows": int(keep.sum()), "base_rate": round(float(label.mean()), 4), "nll": nll}
