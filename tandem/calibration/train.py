"""Distil exit heads from the final layer: KL(target || softmax(head(h))) over K + 1 classes.

Each head trains in fp32 with AdamW (linear warm-up, cosine decay), seeded. 10% of the
collected texts (and so about 10% of the tokens; split by text, since tokens of one text
are correlated) are held out; the head keeps the parameters of its best validation epoch
and stops after `patience` epochs without improvement.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tandem.runtime.exit_head import ExitHead, ExitHeadConfig
from tandem.runtime.model import DecoderModel


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 256
    # 1e-2, not 1e-3: the adapter's up-projection starts at zero and must grow to the scale
    # of the residual stream (rms 5-25); at 1e-3 smollm2's heads end ~0.7 nats worse.
    lr: float = 1e-2
    weight_decay: float = 0.01  # adapter matrices only; never the norms or "other"
    max_epochs: int = 8
    batch_size: int = 256
    val_fraction: float = 0.1
    patience: int = 2
    warmup_steps: int = 20
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def split_by_text(
    text_index: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, validation), holding out `val_fraction` of the texts."""
    n_texts = int(text_index.max()) + 1
    perm = torch.randperm(n_texts, generator=torch.Generator().manual_seed(seed))
    n_val = min(n_texts - 1, max(1, round(n_texts * val_fraction)))
    is_val = torch.zeros(n_texts, dtype=torch.bool)
    is_val[perm[:n_val]] = True
    val_rows = is_val[text_index]
    return (~val_rows).nonzero().squeeze(1), val_rows.nonzero().squeeze(1)


def make_head(model: DecoderModel, layer: int, shortlist: torch.Tensor, rank: int) -> ExitHead:
    """A fresh fp32 head at `layer`: identity adapter, the model's final norm, its LM head rows."""
    cfg = model.cfg
    head = ExitHead(
        ExitHeadConfig(
            layer=layer,
            hidden_size=cfg.hidden_size,
            rank=rank,
            shortlist_size=int(shortlist.shape[0]),
        ),
        cfg.rms_eps,
        cfg.norm_unit_offset,
    )
    with torch.no_grad():
        head.norm_out.weight.copy_(model.norm.weight.float())
        head.shortlist.copy_(shortlist)
    head.attach_lm_head(model.lm_head.weight)
    return head.float()


def kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || softmax(logits))."""
    return F.kl_div(F.log_softmax(logits.float(), -1), target.float(), reduction="batchmean")


@torch.no_grad()
def mean_kl(
    head: ExitHead, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
) -> float:
    total = 0.0
    for idx in rows.split(1024):
        total += float(kl_loss(head(hidden[idx].float()), targets[idx])) * idx.shape[0]
    return total / max(1, rows.shape[0])


def train_head(
    head: ExitHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    cfg: TrainConfig,
    log_prefix: str | None = None,
) -> dict:
    """Train `head` in place on rows of `hidden` [N, d] / `targets` [N, K + 1] (a tensor,
    or anything whose rows come dense on indexing, as `consistency.SoftTargets`)."""
    decay = [head.down.weight, head.up.weight]
    rest = [p for p in head.parameters() if p.requires_grad and all(p is not q for q in decay)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps_per_epoch = math.ceil(train_rows.shape[0] / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    head.train()
    val_init = mean_kl(head, hidden, targets, val_rows)
    train_init = mean_kl(head, hidden, targets, train_rows)
    best_val, best_epoch = val_init, 0
    best_state = {k: v.clone() for k, v in head.trained_state().items()}
    train_kl, epochs_run, bad = train_init, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        perm = train_rows[torch.randperm(train_rows.shape[0], generator=gen)]
        running = 0.0
        for idx in perm.split(cfg.batch_size):
            loss = kl_loss(head(hidden[idx].float()), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * idx.shape[0]
        train_kl = running / perm.shape[0]
        val = mean_kl(head, hidden, targets, val_rows)
        epochs_run = epoch
        if log_prefix is not None:
            print(
                f"{log_prefix} epoch {epoch}: train KL {train_kl:.4f} val KL {val:.4f}",
                file=sys.stderr,
            )
        if val < best_val - 1e-4:
            best_val, best_epoch, bad = val, epoch, 0
            best_state = {k: v.clone() for k, v in head.trained_state().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    head.load_state_dict(best_state, strict=False)
    head.eval()
    return {
        "layer": head.cfg.layer,
        "train_kl_init": round(train_init, 4),
        "val_kl_init": round(val_init, 4),
        "train_kl_last_epoch": round(train_kl, 4),
        "val_kl": round(best_val, 4),
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
    }
