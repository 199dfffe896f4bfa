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

Split mode (`depth` < n_layers, CE-CoLLM's edge): only layers [0, depth) run here. A token
that reaches `depth` is judged by the head at `depth` (or the logit lens when there is
none) and its result carries the split-layer states of every position that reached
`depth` in this step (`StepResult.reached`), for upload to the cloud, which runs the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tandem.runtime.compiled import judge_eager, warm_up
from tandem.runtime.exit_head import ExitDecision, ExitHead, decide
from tandem.runtime.kv_cache import SequenceKV
from tandem.runtime.model import DecoderModel


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

    def truncate(self, n: int) -> None:
        """Roll back to the first n positions: the KV and the deferred rows of every later
        position are dropped, the rest is untouched, so decoding on from position n is
        exactly as if the dropped positions had never been fed."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} positions to {n}")
        self.kv.truncate(n)
        kept = []
        for block in self.pending:
            if block.start_pos < n:
                block.hidden = block.hidden[: n - block.start_pos]
                kept.append(block)
        self.pending = kept
        self.length = n


@dataclass(frozen=True)
class Reached:
    """Split-layer hidden states of positions start_pos.. that reached the split."""

    start_pos: int
    hidden: torch.Tensor  # [n, d]


@dataclass(frozen=True)
class StepResult:
    """Full depth: `logits` over the vocabulary and exit_layer == n_layers.
    Early exit: `logits` over the head's shortlist (without "other") and `shortlist`
    maps an index to its vocabulary id.
    Split mode, token reached the split: exit_layer == depth, `logits` from the head at
    the split (or the logit lens), `confident` says whether they pass tau, and `reached`
    holds the split-layer states to upload."""

    exit_layer: int
    logits: torch.Tensor
    shortlist: torch.Tensor | None = None
    confident: bool = True
    reached: Reached | None = None


ExitRule = Callable[[torch.Tensor, torch.Tensor, float], ExitDecision]


class ExitDecoder:
    def __init__(
        self,
        model: DecoderModel,
        heads: list[ExitHead] | None = None,
        max_deferred: int = 32,
        exit_rule: ExitRule = decide,
        depth: int | None = None,
    ) -> None:
        self.model = model
        self.exit_rule = exit_rule
        self.n_layers = model.cfg.n_layers
        self.depth = self.n_layers if depth is None else depth
        if not 0 < self.depth <= self.n_layers:
            raise ValueError(f"depth {self.depth} must be in (0, {self.n_layers}]")
        heads = sorted(heads or [], key=lambda h: h.cfg.layer)
        self.heads = [h for h in heads if h.cfg.layer < self.depth]
        self.split_head = next((h for h in heads if h.cfg.layer == self.depth), None)
        self.max_deferred = max_deferred
        self.exit_layers = tuple(h.cfg.layer for h in self.heads)

    @property
    def split(self) -> bool:
        return self.depth < self.n_layers

    def ranges(self, use_exits: bool) -> list[tuple[int, int]]:
        """The layer ranges `prefill` and `decode` run as one piece each (what a compiled
        model compiles): the whole depth, and the stretches between exits when they are on."""
        bounds = [0, *self.exit_layers, self.depth] if use_exits else [0, self.depth]
        return sorted({(0, self.depth), *zip(bounds, bounds[1:], strict=False)})

    def warm_up(self, use_exits: bool) -> float:
        """On a compiled model, compile before the first request what `decode` will call:
        the layer ranges and, with exits on, the exit heads with their rule (the split
        head included); returns the seconds it took."""
        heads = [*self.heads, *filter(None, [self.split_head])] if use_exits else []
        # the heads compile with `decide` only (`judge`): other rules run them eager
        rule = decide if self.exit_rule is decide else None
        return warm_up(self.model, self.ranges(use_exits), heads, rule)

    def new_sequence(self) -> SequenceState:
        return SequenceState(kv=self.model.new_kv(0, self.depth))

    @torch.inference_mode()
    def prefill(
        self, seqs: list[SequenceState], prompts: list[list[int]], tau: float = 1.0
    ) -> list[StepResult]:
        """Forward of prompt tokens to `depth` (no early exit); the result for each
        prompt's last token (`tau` only judges it in split mode)."""
        for s in seqs:
            if s.pending:
                raise RuntimeError("prefill on a sequence with pending rows")
        starts = [s.length for s in seqs]
        for s, p in zip(seqs, prompts, strict=True):
            s.length += len(p)
        if not self.split:
            logits = self.model.forward_tokens(prompts, [s.kv for s in seqs], starts)
            return [StepResult(self.n_layers, row) for row in logits]
        rows = [
            (start, self.model.embed(torch.tensor(p, device=self.model.device)))
            for start, p in zip(starts, prompts, strict=True)
        ]
        out = self._run(seqs, rows, 0, self.depth)
        return self._at_split(out, tau)

    @torch.inference_mode()
    def decode(
        self, seqs: list[SequenceState], tokens: list[int], tau: float = 1.0
    ) -> list[StepResult]:
        """One new token per sequence; each may exit at the first confident exit."""
        model = self.model
        emb = model.embed(torch.tensor(tokens, device=model.device))
        rows: dict[int, tuple[int, torch.Tensor]] = {
            i: (s.length, emb[i : i + 1]) for i, s in enumerate(seqs)
        }
        results: dict[int, StepResult] = {}
        use_exits = tau < 1.0
        # Without exits one piece, unless rows deferred by earlier exits must join midway.
        if use_exits or any(s.pending for s in seqs):
            bounds = [0, *self.exit_layers, self.depth]
        else:
            bounds = [0, self.depth]
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
            out = self._run([seqs[i] for i in order], [rows[i] for i in order], a, b)
            rows = dict(zip(order, out, strict=True))
            if b == self.depth or not use_exits:
                continue
            candidates = [i for i in order if seqs[i].pending_rows() < self.max_deferred]
            if not candidates:
                continue
            head = self.heads[head_idx]
            last = torch.cat([rows[i][1][-1:] for i in candidates])
            head_logits, verdict = self.judge(head, last, tau)
            for j, i in enumerate(candidates):
                if bool(verdict.confident[j]):
                    start, hi = rows.pop(i)
                    pending = seqs[i].pending
                    if pending and pending[-1].reached == b:  # rows that stopped here before
                        prev = pending.pop()
                        start, hi = prev.start_pos, torch.cat([prev.hidden, hi])
                    pending.append(PendingBlock(b, start, hi))
                    results[i] = StepResult(b, head_logits[j, :-1], head.shortlist)
        if rows and self.split:
            order = list(rows)
            results.update(zip(order, self._at_split([rows[i] for i in order], tau), strict=True))
        elif rows:
            order = list(rows)
            logits = model.logits(torch.cat([rows[i][1][-1:] for i in order]))
            for j, i in enumerate(order):
                results[i] = StepResult(self.n_layers, logits[j])
        for s in seqs:
            s.length += 1
        return [results[i] for i in range(len(seqs))]

    def judge(
        self, head: ExitHead, last: torch.Tensor, tau: float
    ) -> tuple[torch.Tensor, ExitDecision]:
        """The head's logits for rows `last` and the exit rule's verdict on them: one
        compiled graph where the model decodes compiled and the rule is `decide`
        (tandem.runtime.compiled.CompiledDecode.head), else eager."""
        compiled = self.model.compiled
        if compiled is not None and self.exit_rule is decide:
            return compiled.head(head, decide)(last, tau)
        return judge_eager(head, self.exit_rule, last, tau)

    def _run(
        self,
        seqs: list[SequenceState],
        rows: list[tuple[int, torch.Tensor]],
        a: int,
        b: int,
    ) -> list[tuple[int, torch.Tensor]]:
        """Layers [a, b) for each sequence's rows (start position, [n, d]), batched."""
        out = self.model.run_rows(
            [(s.kv, start, h) for s, (start, h) in zip(seqs, rows, strict=True)], a, b
        )
        return [(start, h) for (start, _), h in zip(rows, out, strict=True)]

    def _at_split(self, rows: list[tuple[int, torch.Tensor]], tau: float) -> list[StepResult]:
        """Results for rows that reached the split: the split head's (or the logit
        lens's) verdict on each last row, plus the states to upload."""
        last = torch.cat([h[-1:] for _, h in rows])
        if self.split_head is not None:
            logits, verdict = self.judge(self.split_head, last, tau)
            shortlist, confident = self.split_head.shortlist, verdict.confident
            logits = logits[:, :-1]
        else:
            logits, shortlist = self.model.logits(last).float(), None
            confident = logits.softmax(-1).amax(-1) >= tau
        return [
            StepResult(
                self.depth,
                logits[j],
                shortlist,
                confident=tau < 1.0 and bool(confident[j]),
                reached=Reached(start, h),
            )
            for j, (start, h) in enumerate(rows)
        ]
