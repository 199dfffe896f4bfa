"""Quality of a served token stream: the full model's bits per character on it.

Every mode of `make bench-collab` serves greedy tokens. Where a confident exit head
answers, the served token is a hard decision (the head's top shortlisted token), not a
distribution, so scoring reference text "with the distribution the mode would use" has no
honest answer for exit positions. Using the head's own softmax there (as the bench did)
scores a calibrated head as nearly certain of its top token and gives every other token,
above all those outside its shortlist, almost no mass: one confident exit on corpus text
whose next token differs cost tens of bits, and the column read 54-132 bits/char.

Instead each run's *output* is scored, the standard way to grade a generated
continuation: the full model (the cloud-only reference, at the bench's quantization)
reads prompt + output teacher-forced, and the stream costs -log2 p(token | prompt, the
stream's own prefix) summed over its tokens, divided by the characters it decodes to.
Cloud-only greedy is (close to) the cheapest stream this measure can see; a wrong exit
costs what the full model thinks of that token at that point (finite, and small when the
head picked a near-tie), and everything after it is scored in the context the user
actually got. Lower is better; the difference to cloud-only's value is what the edge's
decisions cost. (A looping stream can also score low: read it beside the agreement
columns.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tandem.runtime.model import DecoderModel


@dataclass(frozen=True, slots=True)
class StreamScore:
    bits: float  # -log2 p of the stream's tokens under the full model, summed
    chars: int  # characters the stream decodes to
    tokens: int

    @property
    def bits_per_char(self) -> float | None:
        return self.bits / self.chars if self.chars else None


@torch.inference_mode()
def stream_logprobs(
    model: DecoderModel, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """Natural log-probability of each output token under the full model, given the
    prompt and the output's own prefix: [len(output)] fp32."""
    if not output:
        return torch.zeros(0)
    if not prompt:
        raise ValueError("the first output token needs a prompt to be predicted from")
    ids = torch.tensor([*prompt, *output[:-1]])
    h = model.run_sequence(model.embed(ids), model.new_kv(), 0, 0, model.cfg.n_layers)
    logits = model.logits(h[len(prompt) - 1 :]).float()
    targets = torch.tensor(list(output))
    return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]


class StreamScorer:
    """Scores (prompt, output) streams with one model; identical streams are scored once
    (modes that agree with cloud-only, and several clients, repeat them)."""

    def __init__(self, model: DecoderModel, decode: Callable[[Sequence[int]], str]):
        self._model = model
        self._decode = decode
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], StreamScore] = {}

    def score(self, prompt: Sequence[int], output: Sequence[int]) -> StreamScore:
        key = (tuple(prompt), tuple(output))
        hit = self._cache.get(key)
        if hit is None:
            lp = stream_logprobs(self._model, prompt, output)
            bits = -float(lp.double().sum()) / math.log(2)
            hit = StreamScore(bits, len(self._decode(list(output))), len(output))
            self._cache[key] = hit
        return hit

    def bits_per_char(
        self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[Sequence[int]]]
    ) -> float | None:
        """Bits/char over every client's outputs ([client][prompt] token ids), pooled:
        total bits / total characters."""
        bits = chars = 0.0
        for per_client in outputs:
            for prompt, out in zip(prompts, per_client, strict=True):
                s = self.score(prompt, out)
                bits += s.bits
                chars += s.chars
        return bits / chars if chars else None
