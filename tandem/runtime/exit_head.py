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

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Gather the shortlisted rows of the model's (unquantized) LM head."""
        w = lm_head_weight.detach()[self.shortlist].clone()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        self.proj.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the shortlist plus a last "other" class, [..., K + 1]."""
        a = h + self.up(torch.nn.functional.silu(self.down(self.norm_in(h))))
        a = self.norm_out(a)
        return torch.cat([self.proj(a).float(), self.other(a).float()], dim=-1)

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("proj.")}


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
        heads.append(head.to(dtype).eval())
    return heads, blob["meta"]
