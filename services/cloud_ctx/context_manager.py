"""CE-CoLLM's cloud context manager: the upper layers [split, L) of a split model.

The edge uploads split-layer hidden states of new positions (incrementally, while it
keeps generating) and asks for a token at the newest position. On a request the cloud
first catches up: every pending uploaded position and the asked one run through its
layers in one batched forward, which fills their KV; the last row gives the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.cloud_ctx.session_store import SessionStore
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import Sampler, SamplingParams


class PositionMismatch(ValueError):
    """An upload or request does not continue the session; `expected` is where it must."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


@dataclass(frozen=True)
class CloudToken:
    token: int
    prob: float
    catch_up_rows: int  # rows run in this request's forward (pending + the asked one)


class CloudContextManager:
    def __init__(self, model: DecoderModel, split: int, store: SessionStore) -> None:
        if not 0 < split < model.cfg.n_layers:
            raise ValueError(f"split {split} must be inside (0, {model.cfg.n_layers})")
        self.model = model
        self.split = split
        self.store = store

    def upload(self, session_id: str, start_pos: int, hidden: torch.Tensor) -> int:
        """Append hidden states [n, d] for positions start_pos.. ; returns positions held.
        Idempotent: rows for positions already held are skipped (an edge resends from its
        last acknowledged position after a failure); a gap raises PositionMismatch."""
        if start_pos < 0:
            raise ValueError(f"upload starts at negative position {start_pos}")
        session = self.store.get_or_create(session_id)
        if start_pos > session.uploaded:
            raise PositionMismatch(
                f"session {session_id!r} holds {session.uploaded} positions; "
                f"upload starts at {start_pos}",
                session.uploaded,
            )
        fresh = hidden[session.uploaded - start_pos :]
        if fresh.shape[0]:
            session.pending.append(fresh.to(self.model.dtype))
            session.uploaded += fresh.shape[0]
            self.store.enforce_cap(keep=session_id)
        return session.uploaded

    @torch.inference_mode()
    def next_token(
        self,
        session_id: str,
        position: int,
        params: SamplingParams,
        hidden: torch.Tensor | None = None,
    ) -> CloudToken:
        """The token after `position`, which must be the session's newest position. Its
        hidden state was uploaded before or comes with the request: `hidden` [n, d] holds
        the states of positions position-n+1 .. position.
        The session keeps the sampler made from its first request's `params` (a seed then
        reproduces the whole stream)."""
        if hidden is not None:
            self.upload(session_id, position + 1 - hidden.shape[0], hidden)
        session = self.store.get(session_id)
        if position != session.uploaded - 1:
            raise PositionMismatch(
                f"asked for position {position}; session {session_id!r} ends at "
                f"{session.uploaded - 1}",
                session.uploaded - 1,
            )
        rows = torch.cat(session.pending)
        n = rows.shape[0]
        start = session.computed
        h = self.model.run_sequence(rows, session.kv, start, self.split, self.model.cfg.n_layers)
        session.pending.clear()
        session.computed = session.uploaded
        if session.sampler is None:
            session.sampler = Sampler(params)
        token, prob = session.sampler.sample(self.model.logits(h[-1:])[0])
        self.store.enforce_cap(keep=session_id)
        return CloudToken(token, prob, n)

    def release(self, session_id: str) -> bool:
        return self.store.release(session_id)
