"""Speculative sessions in the cloud context manager (real Redis, tiny model): drafts are
judged as their rows arrive, a rejection truncates the session (memory and log) and starts
a new epoch, older-epoch messages are answered with that rollback, and a replica that
rebuilds the session from the log carries on exactly."""

from __future__ import annotations

import pytest

from services.cloud_ctx.context_manager import CloudContextManager, TokenAsk
from services.cloud_ctx.session_log import SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft, Rollback, Speculation
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129, 7]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _cloud(model, client, prefix: str, replica: str) -> CloudContextManager:
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    log = SessionLog(client, replica_id=replica, ttl_s=60, prefix=prefix)
    return CloudContextManager(model, SPLIT, store, log)


def test_rejection_truncates_memory_and_log_and_a_rebuild_carries_on(
    model, redis_client, redis_prefix
):
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    wrong = (want[0] + 1) % model.cfg.vocab_size
    a = _cloud(model, redis_client, redis_prefix, "a")
    edge = EdgeHalf(model, SPLIT)
    p = len(PROMPT)

    # The prompt and a wrong draft after it, plus one row fed on that draft.
    rows = edge.hidden([*PROMPT, wrong])
    spec = Speculation(0, GREEDY, (Draft(p - 1, wrong), Draft(p, 3)))
    held, verdict = a.speculate("s", 0, rows, spec)
    assert verdict.epoch == 1
    assert verdict.rollback == Rollback(p - 1, want[0], verdict.rollback.prob)
    assert held == verdict.checked == p  # the row fed on the wrong draft is gone
    assert a.log.touch("s") == p  # ... from the log too

    # A message sent before the edge saw the rollback: answered with it, nothing changes.
    held, stale = a.speculate("s", p, edge.hidden([1]), Speculation(0, GREEDY, (Draft(p, 1),)))
    assert stale == verdict and held == p

    # The edge rolls back (its own KV too) and goes on from the cloud's token, drafting right.
    edge.kv.truncate(p)
    edge.length = p
    held, verdict = a.speculate(
        "s", p, edge.hidden([want[0]]), Speculation(1, GREEDY, (Draft(p, want[1]),))
    )
    assert verdict.epoch == 1 and verdict.checked == p + 1 and held == p + 1

    # Another replica takes over from the log and answers the next token exactly.
    b = _cloud(model, redis_client, redis_prefix, "b")
    ask = TokenAsk("s", p + 1, GREEDY, edge.hidden([want[1]]), Speculation(1, GREEDY))
    [answer] = b.next_tokens([ask])
    assert answer.token == want[2]
    assert answer.verdict.epoch == 1 and answer.verdict.checked == p + 2
    assert b.rebuilds == 1


def test_a_draft_for_the_asked_position_is_the_answer_when_right(model):
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    cloud = CloudContextManager(model, SPLIT, store)
    edge = EdgeHalf(model, SPLIT)
    p = len(PROMPT)
    rows = edge.hidden(PROMPT)
    right = TokenAsk("s", p - 1, GREEDY, rows, Speculation(0, GREEDY, (Draft(p - 1, want[0]),)))
    [answer] = cloud.next_tokens([right])
    assert answer.token == want[0] and answer.verdict.epoch == 0
    assert answer.verdict.checked == p
    held, verdict = cloud.speculate("s", p, edge.hidden([want[0]]), Speculation(0, GREEDY))
    assert held == p + 1 and verdict.checked == p  # no draft: the newest row waits for its ask
    [answer] = cloud.next_tokens([TokenAsk("s", p, GREEDY, None, Speculation(0, GREEDY))])
    assert answer.token == want[1] and answer.catch_up_rows == 1


def test_speculative_uploads_after_the_cache_grew(model):
    """Past the KV cache's first allocation (64 positions) an upload still runs its rows."""
    prompt = [(7 * i) % 250 + 3 for i in range(80)]
    want = list(generate(ExitDecoder(model), prompt, GREEDY).token_ids)
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    cloud = CloudContextManager(model, SPLIT, store)
    edge = EdgeHalf(model, SPLIT)
    p = len(prompt)
    [answer] = cloud.next_tokens([TokenAsk("s", p - 1, GREEDY, edge.hidden(prompt))])
    assert answer.token == want[0]
    spec = Speculation(0, GREEDY, (Draft(p, want[1]),))
    held, verdict = cloud.speculate("s", p, edge.hidden([want[0]]), spec)
    assert held == p + 1 and verdict.checked == p + 1 and verdict.rollback is None
