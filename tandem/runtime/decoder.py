"""Batched decoding with early exit and deferred KV computation.

Method (exact): when a token exits after layer e, layers [e, L) are not run for it. Its
hidden state after e layers is kept as a *pending block*. The next token of the same
sequence that reaches layer e takes the pending rows along: from layer e on they run in
the same batch as that token, which fills their KV at every layer they skipped. The KV
is therefore identical to full-depth computation (no state copying, no approximation).

Invariant: the number of layers computed per position never increases along a sequence,
so at any layer the rows to run form a contiguous suffix of positions; rows that stop at
the same exit are merged, so there is at most one pending block per exit point.

Cost: the pending rows' dense compute is paid later, batched with a new token (cheap on
memory-bound decode), plus the memory of the pending hidden states; `max_deferred` caps
it by forcing a full-depth token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tandem.runtime.exit_head import ExitDecision, ExitHead, decide
from tandem.runtime.kv_cache import SequenceKV
from tandem.runtime.model import DecoderModel, Segment


@dataclass
class PendingBlock:
    reached: int  # layers already computed for these rows
    start_pos: int
    hidden: torch.Tensor  # [n, d], the state after `reached` layers


@dataclass
class SequenceState:
    kv: SequenceKV
    length: int = 0  # positions fed so far
    pending: list[PendingBlock] = field(default_factory=list)

    def pending_rows(self) -> int:
        return sum(b.hidden.shape[0] for b in self.pending)


@dataclass(frozen=True)
class StepResult:
    """Full depth: `logits` over the vocabulary and exit_layer == n_layers.
    Early exit: `logits` over the head's shortlist (without "other") and `shortlist`
    maps an index to its vocabulary id."""

    exit_layer: int
    logits: torch.Tensor
    shortlist: torch.Tensor | None = None


ExitRule = Callable[[torch.Tensor, torch.Tensor, float], ExitDecision]


class ExitDecoder:
    def __init__(
        self,
        model: DecoderModel,
        heads: list[ExitHead] | None = None,
        max_deferred: int = 32,
        exit_rule: ExitRule = decide,
    ) -> None:
        self.model = model
        self.exit_rule = exit_rule
        self.heads = sorted(heads or [], key=lambda h: h.cfg.layer)
        self.max_deferred = max_deferred
        self.n_layers = model.cfg.n_layers
        self.exit_layers = tuple(h.cfg.layer for h in self.heads)

    def new_sequence(self) -> SequenceState:
        return SequenceState(kv=self.model.new_kv())

    @torch.inference_mode()
    def prefill(self, seqs: list[SequenceState], prompts: list[list[int]]) -> list[StepResult]:
        """Full-depth forward of prompt tokens; logits of each prompt's last token."""
        for s in seqs:
            if s.pending:
                raise RuntimeError("prefill on a sequence with pending rows")
        logits = self.model.forward_tokens(prompts, [s.kv for s in seqs], [s.length for s in seqs])
        for s, p in zip(seqs, prompts, strict=True):
            s.length += len(p)
        return [StepResult(self.n_layers, row) for row in logits]

    @torch.inference_mode()
    def decode(
        self, seqs: list[SequenceState], tokens: list[int], tau: float = 1.0
    ) -> list[StepResult]:
        """One new token per sequence; each may exit at the first confident exit."""
        model = self.model
        emb = model.embed(torch.tensor(tokens))
        rows: dict[int, tuple[int, torch.Tensor]] = {
            i: (s.length, emb[i : i + 1]) for i, s in enumerate(seqs)
        }
        results: dict[int, StepResult] = {}
        bounds = [0, *self.exit_layers, self.n_layers]
        use_exits = tau < 1.0
        for head_idx in range(len(bounds) - 1):
            if not rows:
                break
            a, b = bounds[head_idx], bounds[head_idx + 1]
            for i in rows:  # pending rows that stopped at layer a join here
                s = seqs[i]
                if s.pending and s.pending[-1].reached == a:
                    block = s.pending.pop()
                    start, h = rows[i]
                    rows[i] = (block.start_pos, torch.cat([block.hidden, h]))
            order = list(rows)
            h, positions, segments, off = [], [], [], 0
            for i in order:
                start, hi = rows[i]
                n = hi.shape[0]
                h.append(hi)
                positions.append(torch.arange(start, start + n))
                segments.append(Segment(seqs[i].kv, off, n, start))
                off += n
            out = model.run_layers(torch.cat(h), torch.cat(positions), segments, a, b)
            for i, seg in zip(order, segments, strict=True):
                rows[i] = (rows[i][0], out[seg.start : seg.start + seg.count])
            if b == self.n_layers or not use_exits:
                continue
            candidates = [i for i in order if seqs[i].pending_rows() < self.max_deferred]
            if not candidates:
                continue
            head = self.heads[head_idx]
            last = torch.cat([rows[i][1][-1:] for i in candidates])
            head_logits = head(last)
            verdict = self.exit_rule(head_logits, head.shortlist, tau)
            for j, i in enumerate(candidates):
                if bool(verdict.confident[j]):
                    start, hi = rows.pop(i)
                    pending = seqs[i].pending
                    if pending and pending[-1].reached == b:  # rows that stopped here before
                        prev = pending.pop()
                        start, hi = prev.start_pos, torch.cat([prev.hidden, hi])
                    pending.append(PendingBlock(b, start, hi))
                    results[i] = StepResult(b, head_logits[j, :-1], head.shortlist)
        if rows:
            order = list(rows)
            logits = model.logits(torch.cat([rows[i][1][-1:] for i in order]))
            for j, i in enumerate(order):
                results[i] = StepResult(self.n_layers, logits[j])
        for s in seqs:
            s.length += 1
        return [results[i] for i in range(len(seqs))]
