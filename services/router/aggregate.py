"""How the router combines the answers of k > 1 experts run in parallel (the fine level's
aggregation rule).

Gate-weighted plurality vote over whole answers: answers that are equal after whitespace
normalisation and case folding pool their gate weights; the group with the most weight wins,
and its member with the largest gate weight is returned (ties: the earlier expert in the gate's
ranking). With answers that all differ this returns the highest-weight expert's answer, so
k > 1 then buys robustness (another expert's answer when one fails) rather than quality.

Token-level mixing (averaging next-token distributions) would need per-step distributions
from every expert over a shared vocabulary; the experts here do not expose them (and
smollm2 / gemma3 / Qwen tokenizers differ), so it is not done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RULE = "gate-weighted plurality vote"


@dataclass(frozen=True)
class Answer:
    expert_id: str
    weight: float
    text: str


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def weighted_vote(answers: Sequence[Answer]) -> Answer:
    """The winning answer (`answers` in the gate's ranking order, best first)."""
    if not answers:
        raise ValueError("no answers to aggregate")
    pooled: dict[str, float] = {}
    for a in answers:
        pooled[_key(a.text)] = pooled.get(_key(a.text), 0.0) + a.weight
    best = max(pooled.values())
    for a in answers:  # ranking order: the first member of a winning group has its top weight
        if pooled[_key(a.text)] == best:
            return max(
                (b for b in answers if _key(b.text) == _key(a.text)),
                key=lambda b: b.weight,
            )
    raise AssertionError("unreachable")
