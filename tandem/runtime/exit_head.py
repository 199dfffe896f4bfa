"""Early-exit heads: a small trained adapter in front of a shortlist of the model's own
LM head rows.

For exit point e (the hidden state after e layers):

    a = h + up(silu(down(norm_in(h))))        low-rank residual adapter (trained)
    logits = [lm_head[shortlist] @ norm_out(a), other(norm_out(a))]

The shortlist holds the K tokens the final layer predicts most often on the calibration
corpus; the extra "other" class stands for every token outside it, so a confident exit is
one whose top class is a real token with probability >= tau. Only the adapter, the norms
and the "other" row are trained (distilled from the final layer's distribution), so the
artifact is small; the K x d projection is gathered from the model's LM head at load time.

Calibrated heads (`calibrated=True`, trained by tandem.calibration.consistency) add a
CALM-style consistency classifier: c = sigmoid(w_s . stats(p) + w_h . u + b), where p is
the head's raw softmax, stats are its top probability, "other" probability, margin,
entropy and log top probability, and u = silu(down(norm_in(h))) is the adapter's own
low-rank feature. c estimates P(head's top token == the final layer's greedy token). The
head then returns logits whose softmax gives the top token exactly probability c (by
raising the "other" logit, or, where c is above the raw token-only top probability, by
sharpening the token logits), so `decide(logits, shortlist, tau)` exits when the estimated
agreement is >= tau and every caller keeps working unchanged. The argmax token never moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tandem.runtime.model import RMSNorm


@dataclass(frozen=True)
class ExitHeadConfig:
    layer: int  # exit after this many layers
    hidden_size: int
    rank: int
    shortlist_size: int
    calibrated: bool = False  # has a consistency classifier (see the module docstring)


N_STATS = 5


class ExitHead(nn.Module):
    def __init__(self, cfg: ExitHeadConfig, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.norm_in = RMSNorm(d, eps, unit_offset=False)
        self.down = nn.Linear(d, cfg.rank, bias=False)
        self.up = nn.Linear(cfg.rank, d, bias=False)
        nn.init.zeros_(self.up.weight)
        self.norm_out = RMSNorm(d, eps, unit_offset)
        self.other = nn.Linear(d, 1, bias=True)
        nn.init.zeros_(self.other.weight)
        nn.init.constant_(self.other.bias, -2.0)
        self.register_buffer("shortlist", torch.zeros(cfg.shortlist_size, dtype=torch.long))
        self.proj: nn.Module = nn.Linear(d, cfg.shortlist_size, bias=False)
        self.proj.requires_grad_(False)
        if cfg.calibrated:  # plain parameters, not nn.Linear: never quantized
            self.conf_stats = nn.Parameter(torch.zeros(N_STATS))
            self.conf_hidden = nn.Parameter(torch.zeros(cfg.rank))
            self.conf_bias = nn.Parameter(torch.zeros(1))

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Gather the shortlisted rows of the model's (unquantized) LM head."""
        w = lm_head_weight.detach()[self.shortlist].clone()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        self.proj.weight = nn.Parameter(w, requires_grad=False)

    def raw(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncalibrated logits [..., K + 1] and the adapter feature u [..., rank]."""
        x = h.to(self.down.weight.dtype)  # the adapter may run wider than h (fp32_adapter)
        u = torch.nn.functional.silu(self.down(self.norm_in(x)))
        a = self.norm_out((x + self.up(u)).to(h.dtype))
        other = self.other(a.to(self.other.weight.dtype))
        return torch.cat([self.proj(a).float(), other.float()], dim=-1), u

    def fp32_adapter(self) -> ExitHead:
        """Keep the small trained parts (input norm, down/up, "other") in fp32 in a bf16
        head: their one-row bf16 matmuls are slow on CPU without AVX-512 BF16 (down: 465
        against 40 us on the AVX2 host), and fp32 is what they were trained in. norm_out and
        the shortlist rows stay in the head's dtype (the rows are quantized as served)."""
        for part in (self.norm_in, self.down, self.up, self.other):
            part.float()
        return self

    def confidence(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Consistency classifier: estimated P(top token == final greedy token), [...]."""
        z = confidence_stats(logits) @ self.conf_stats.float()
        z = z + u.float() @ self.conf_hidden.float() + self.conf_bias.float()
        return torch.sigmoid(z)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the shortlist plus a last "other" class, [..., K + 1]; for a
        calibrated head, with the top token's probability set to the classifier's c."""
        logits, u = self.raw(h)
        if not self.cfg.calibrated:
            return logits
        return with_top_probability(logits, self.confidence(logits, u))

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("proj.")}


def confidence_stats(logits: torch.Tensor) -> torch.Tensor:
    """[..., N_STATS] of the raw head softmax: top prob, "other" prob, top - second,
    entropy, log top prob."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    p = lp.exp()
    top2 = p.topk(2, dim=-1).values
    entropy = -(p * lp).sum(-1)
    return torch.stack(
        [top2[..., 0], p[..., -1], top2[..., 0] - top2[..., 1], entropy, lp.amax(-1)], -1
    )


def with_top_probability(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Logits [..., K + 1] whose softmax gives the top token probability `c` (rows whose
    top class is "other" are returned as they are). Token logits are kept where c is at
    most their own top share (only "other" moves); else the top token's logit alone rises
    to logit(c) + logsumexp(every other class, "other" included), in closed form (a few
    ops: a bisection that sharpened all token logits cost ~2 ms a call on CPU). The rest
    keep their proportions, so "other" (the tokens outside the shortlist) never drops to
    zero, and a scored text's off-shortlist tokens keep a finite cost."""
    logits = logits.float()
    c = c.float().clamp(1e-6, 1 - 1e-6)
    tok, other = logits[..., :-1], logits[..., -1]
    zt, top = tok.max(-1)
    lse = torch.logsumexp(tok, -1)
    top_is_token = zt >= other
    log_c = torch.log(c)
    # case A: c <= exp(zt - lse): other = log(exp(zt) / c - exp(lse))
    x = (lse - zt + log_c).clamp(max=-1e-6)
    other_a = zt - log_c + torch.log(-torch.expm1(x))
    raise_top = (lse - zt + log_c) > -1e-6
    # case B: the top token's share among the tokens is below c
    rest = lse + torch.log(-torch.expm1((zt - lse).clamp(max=-1e-7)))  # the other tokens
    rest = torch.logaddexp(rest, other)  # and "other"
    raised = tok.scatter(-1, top[..., None], (log_c - torch.log1p(-c) + rest)[..., None])
    out_tok = torch.where((raise_top & top_is_token)[..., None], raised, tok)
    new_other = torch.where(raise_top, other, other_a)
    new_other = torch.where(top_is_token, new_other, other)
    return torch.cat([out_tok, new_other[..., None]], -1)


@dataclass(frozen=True)
class ExitDecision:
    confident: torch.Tensor  # [B] bool
    token: torch.Tensor  # [B] long, vocabulary id of the top shortlist token
    prob: torch.Tensor  # [B] float


def target_logprob(
    logits: torch.Tensor, shortlist: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Per row, the head's log-probability of a target vocabulary id: its own class if
    the target is shortlisted, else the "other" mass spread evenly over the vocab_size - K
    tokens outside the shortlist. logits: [n, K + 1]; targets: [n]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    in_short = (shortlist[None, :] == targets[:, None]).float()
    tok_lp = (lp[:, :-1] * in_short).sum(-1)
    other_lp = lp[:, -1] - math.log(vocab_size - shortlist.shape[0])
    return torch.where(in_short.sum(-1) > 0, tok_lp, other_lp)


def decide(logits: torch.Tensor, shortlist: torch.Tensor, tau: float) -> ExitDecision:
    """A row exits when its top class is a shortlisted token with probability >= tau."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.max(dim=-1)
    is_token = top_i < shortlist.shape[0]
    token = shortlist[top_i.clamp(max=shortlist.shape[0] - 1)]
    return ExitDecision(confident=is_token & (top_p >= tau), token=token, prob=top_p)


def save_heads(heads: list[ExitHead], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "meta": meta,
            "heads": [
                {
                    "config": vars(h.cfg),
                    "state": {k: v.clone() for k, v in h.trained_state().items()},
                }
                for h in heads
            ],
        },
        path,
    )


def load_heads(
    path: Path, lm_head_weight: torch.Tensor, eps: float, unit_offset: bool, dtype: torch.dtype
) -> tuple[list[ExitHead], dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    heads = []
    for entry in blob["heads"]:
        head = ExitHead(ExitHeadConfig(**entry["config"]), eps, unit_offset)
        missing, unexpected = head.load_state_dict(entry["state"], strict=False)
        if unexpected or [m for m in missing if not m.startswith("proj.")]:
            raise ValueError(f"{path}: exit head does not match: {missing} {unexpected}")
        head.attach_lm_head(lm_head_weight)
        head = head.to(dtype).eval()
        heads.append(head.fp32_adapter() if dtype in (torch.bfloat16, torch.float16) else head)
    return heads, blob["meta"]
