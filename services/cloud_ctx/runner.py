"""How cloud_ctx runs its layers [split, L) for a batch of sessions' new rows.

`LocalRunner` keeps each session's KV in the session (`CloudSession.kv`) and attends locally.
`services.cloud_ctx.offload.OffloadRunner` keeps no KV at all: attention goes to an attention
pool (Lamina). Both take (session, rows [n, d]) pairs whose rows continue the session at
`session.computed`, and return the output rows of each; `truncate` drops the KV of a
session's positions from n on (a speculative rollback), wherever it is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from services.cloud_ctx.session_store import CloudSession
from tandem.runtime.model import DecoderModel


class LayerRunner(Protocol):
    def run(self, batch: Sequence[tuple[CloudSession, torch.Tensor]]) -> list[torch.Tensor]: ...

    def release(self, session_id: str) -> None:
        """The session is gone (released, evicted, rebuilt): free what the runner holds."""
        ...

    def truncate(self, session: CloudSession, n: int) -> None:
        """Keep the KV of the session's first n positions (a speculative rollback; n is at
        most `session.computed`). An offload runner raises PoolKVLost if the pool lost it."""
        ...


class LocalRunner:
    def __init__(self, model: DecoderModel, start: int) -> None:
        self.model = model
        self.start = start

    def run(self, batch: Sequence[tuple[CloudSession, torch.Tensor]]) -> list[torch.Tensor]:
        return self.model.run_rows(
            [(s.kv, s.computed, rows) for s, rows in batch], self.start, self.model.cfg.n_layers
        )

    def release(self, session_id: str) -> None:
        return None

    def truncate(self, session: CloudSession, n: int) -> None:
        session.kv.truncate(n)
