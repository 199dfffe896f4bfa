"""The edge half of a split model for cloud tests: embeds tokens and runs layers
[0, split) with its own KV cache."""

from __future__ import annotations

import torch

from tandem.runtime.model import DecoderModel


class EdgeHalf:
    def __init__(self, model: DecoderModel, split: int) -> None:
        self.model = model
        self.split = split
        self.kv = model.new_kv(0, split)
        self.length = 0  # positions run so far

    @torch.inference_mode()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        """Split-layer hidden states of the next positions, [len(ids), d]."""
        start, self.length = self.length, self.length + len(ids)
        h = self.model.embed(torch.tensor(ids))
        return self.model.run_sequence(h, self.kv, start, 0, self.split)
