"""The edge node's scores of a prompt's own text (`edge.proto` PromptScore), for the router's
k > 1 pick across tokenizers (services/router/self_score.py).

One full-depth pass of the model over the text as plain text (the raw prompt, or the chat
messages' contents joined by newlines; no chat template), separate from generation: the
log-loss of every token after the first, the number of tokens, the mean entropy of the
next-token distributions that predict a prompt token, and the entropy and top-1 log-prob of
the distribution after the last token. It runs in a worker thread beside the engine with its
own KV cache (never one of a compiled decode's static slots), on the shared weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tandem.runtime.kv_cache import SequenceKV


@dataclass(frozen=True)
class PromptScore:
    prompt_nll: float
    prompt_tokens: int
    mean_entropy: float
    last_entropy: float
    last_top1: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scores_of_logits(ids: Sequence[int], logits: torch.Tensor) -> PromptScore:
    """The score of prompt ``ids`` from the logits at every position, [len(ids), V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    n = len(ids)
    nll = -float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()) if n > 1 else 0.0
    mean_ent = float(ent[:-1].mean()) if n > 1 else float(ent[-1])
    return PromptScore(nll, n, mean_ent, float(ent[-1]), float(logp[-1].max()))


class ModelPromptScorer:
    """Scores text with a model (tandem.runtime.model) and its codec."""

    def __init__(self, model: Any, codec: Any, max_tokens: int = 512) -> None:
        self.model = model
        self.codec = codec
        self.max_tokens = max_tokens  # longer text: its first max_tokens tokens

    @torch.inference_mode()
    def score(self, text: str) -> PromptScore:
        ids = list(self.codec.encode(text))[: self.max_tokens]
        if not ids:
            raise ValueError("nothing to score")
        m = self.model
        kv = SequenceKV(m.cfg.n_layers, m.cfg.n_kv_heads, m.cfg.head_dim, m.dtype, device=m.device)
        h = m.run_sequence(m.embed(torch.tensor(ids, device=m.device)), kv, 0, 0, m.cfg.n_layers)
        return scores_of_logits(ids, m.logits(h).cpu())

    @staticmethod
    def of_engine(engine: Any) -> ModelPromptScorer | None:
        """A scorer for an engine with a full-depth decoder (`EdgeEngine`), else None."""
        decoder = getattr(engine, "decoder", None)
        codec = getattr(engine, "codec", None)
        if decoder is None or codec is None or getattr(decoder, "split", True):
            return None
        return ModelPromptScorer(decoder.model, codec)
