"""Teacher-forced bits per character of a loaded model, with or without early exit."""

from __future__ import annotations

import math

import torch

from tandem.models.loader import LoadedModel
from tandem.runtime.exit_head import decide, target_logprob


@torch.inference_mode()
def bits_per_char(lm: LoadedModel, texts: list[str], tau: float = 1.0) -> tuple[float, float]:
    """Teacher-forced bits/char. With tau < 1 each position's distribution comes from the
    first confident exit (shortlist; the "other" mass is spread evenly over the rest of
    the vocabulary), else from the final layer. Deferred KV is exact, so this equals what
    free-running decoding would assign at each position. Returns (bpc, exit fraction)."""
    model, heads = lm.model, (lm.heads if tau < 1.0 else [])
    bounds = [0, *[h.cfg.layer for h in heads], model.cfg.n_layers]
    nll, chars, exited, total = 0.0, 0, 0, 0
    for text in texts:
        ids = lm.codec.encode(text)[:256]
        n = len(ids)
        targets = torch.tensor(ids[1:])
        kv = model.new_kv()
        h = model.embed(torch.tensor(ids))
        logp = torch.empty(n - 1)
        decided = torch.zeros(n - 1, dtype=torch.bool)
        for i, head in enumerate(heads):
            h = model.run_sequence(h, kv, 0, bounds[i], bounds[i + 1])
            logits = head(h[:-1])
            d = decide(logits, head.shortlist, tau)
            take = d.confident & ~decided
            lp_target = target_logprob(logits, head.shortlist, targets, model.cfg.vocab_size)
            logp[take] = lp_target[take]
            decided |= take
        h = model.run_sequence(h, kv, 0, bounds[-2], bounds[-1])
        final = torch.log_softmax(model.logits(h[:-1]).float(), dim=-1)
        final_lp = final.gather(1, targets[:, None])[:, 0]
        logp[~decided] = final_lp[~decided]
        nll -= float(logp.sum())
        chars += len(lm.codec.decode(ids[1:]))
        exited += int(decided.sum())
        total += n - 1
    return nll / chars / math.log(2), exited / max(total, 1)
