"""Speculative (lossless) sessions in offload mode: cloud_ctx's layers here, every attention
in a real attention pool (2 workers, KV split by head, real gRPC on 127.0.0.1; tiny fp32
llama, fp16 on the wire). A rejected draft truncates the session's KV on every worker (after
the prefill it loaded, or after remote decode rows), and the tokens equal the full model's
greedy run. If the pool loses the session's KV (during a speculative run, or during the
truncation itself), the session is recomputed from its Redis log and the tokens still
equal the full model's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager, TokenAsk
from services.cloud_ctx.offload import OffloadRunner
from services.cloud_ctx.session_log import SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.clients.pool import PoolClient, PoolShape
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft, Rollback, Speculation
from tests.services.attention_pool.inproc_pool import InProcPool, PoolSpec, inproc_pool
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129, 7]
WIRE = torch.float16


@pytest.fixture(scope="module")
def model() -> DecoderModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pool(model) -> Iterator[InProcPool]:
    cfg = model.cfg
    n = cfg.n_layers - SPLIT
    spec = PoolSpec(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attn_scale, SPLIT, n, WIRE)
    with inproc_pool(spec) as p:
        yield p


def offload_manager(model, pool: InProcPool, log: SessionLog | None = None):
    cfg = model.cfg
    client = PoolClient(pool.addresses, PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, WIRE))
    runner = OffloadRunner(model, SPLIT, client, micro_batches=2, pool_wait_s=5)
    n = cfg.n_layers
    store = SessionStore(
        lambda: model.new_kv(first_layer=n, last_layer=n), StoreLimits(), on_drop=runner.release
    )
    return CloudContextManager(model, SPLIT, store, log, runner), client


def pool_lengths(pool: InProcPool, sid: str) -> set[int]:
    """Positions each worker holds for `sid` at each of its layers."""
    return {
        svc.store.length(sid, layer)
        for svc in pool.servicers
        for layer in range(svc.store.first_layer, svc.store.first_layer + svc.store.n_layers)
    }


def _run_with_rollbacks(model, cloud, pool, sid: str, before_step=None) -> list[int]:
    """The edge's side of a speculative session, scripted: a wrong draft after the prompt
    (rollback right after the prefill), right drafts, a wrong draft among remote decode
    rows (rollback in the pool's decode KV), then plain token requests. Returns the tokens
    the cloud settled (what the edge emits). `before_step(i)` runs before step i."""
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    vocab = model.cfg.vocab_size
    edge = EdgeHalf(model, SPLIT)
    p = len(PROMPT)
    hook = before_step or (lambda i: None)
    out: list[int] = []

    def roll_back(to: int) -> None:
        edge.kv.truncate(to)
        edge.length = to

    # 1. The prompt, a wrong draft after it and a row fed on that draft.
    hook(1)
    wrong = (want[0] + 1) % vocab
    spec = Speculation(0, GREEDY, (Draft(p - 1, wrong), Draft(p, 3)))
    held, verdict = cloud.speculate(sid, 0, edge.hidden([*PROMPT, wrong]), spec)
    assert verdict.epoch == 1 and held == verdict.checked == p
    assert verdict.rollback == Rollback(p - 1, want[0], verdict.rollback.prob)
    out.append(verdict.rollback.token)
    roll_back(p)

    # 2. Right drafts: the cloud's token, then the edge's draft of the next one.
    hook(2)
    spec = Speculation(1, GREEDY, (Draft(p, want[1]),))
    held, verdict = cloud.speculate(sid, p, edge.hidden([want[0]]), spec)
    assert verdict.epoch == 1 and verdict.rollback.position == p - 1
    assert held == verdict.checked == p + 1
    out.append(want[1])  # accepted: the edge emits its draft

    # 3. A right draft then a wrong one, on rows that attend in the pool.
    hook(3)
    wrong = (want[3] + 1) % vocab
    spec = Speculation(1, GREEDY, (Draft(p + 1, want[2]), Draft(p + 2, wrong), Draft(p + 3, 4)))
    rows = edge.hidden([want[1], want[2], wrong])
    held, verdict = cloud.speculate(sid, p + 1, rows, spec)
    assert verdict.epoch == 2 and held == verdict.checked == p + 3
    assert verdict.rollback == Rollback(p + 2, want[3], verdict.rollback.prob)
    out += [want[2], verdict.rollback.token]
    roll_back(p + 3)

    # 4. Plain requests (no drafts) for the rest.
    pos, token = p + 2, out[-1]
    for i in range(4, GREEDY.max_tokens):
        hook(i)
        pos += 1
        ask = TokenAsk(sid, pos, GREEDY, edge.hidden([token]), Speculation(2, GREEDY))
        [answer] = cloud.next_tokens([ask])
        assert not isinstance(answer, Exception), answer
        assert answer.verdict.epoch == 2
        token = answer.token
        out.append(token)
    assert out[:4] == want[:4]
    return out


def test_speculative_session_over_the_pool_equals_the_full_model(model, pool):
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    cloud, client = offload_manager(model, pool)
    try:
        seen = []

        def check(i: int) -> None:
            if i in (2, 4):  # just after a rollback: every worker and layer truncated
                seen.append(pool_lengths(pool, "s"))

        got = _run_with_rollbacks(model, cloud, pool, "s", check)
        assert got == want
        p = len(PROMPT)
        assert seen == [{p}, {p + 3}]
        assert cloud.kv_rebuilds == 0
        assert pool_lengths(pool, "s") == {p + GREEDY.max_tokens - 1}
        cloud.release("s")
        assert all("s" not in svc.store for svc in pool.servicers)
    finally:
        client.close()


def test_kv_lost_in_the_pool_is_recomputed_from_the_log(model, pool, redis_client, redis_prefix):
    """A worker loses the session (i) before a speculative run and (ii) during the
    truncation of a rollback: both times the session is rebuilt from the log, its KV
    recomputed, and the tokens stay the full model's."""
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    log = SessionLog(redis_client, replica_id="a", ttl_s=60, prefix=redis_prefix)
    cloud, client = offload_manager(model, pool, log)
    real_truncate = client.truncate
    lost_in_truncate = []

    def lossy_truncate(session_id: str, n: int, **kw) -> None:
        pool.servicers[1].store.release(session_id)  # the worker restarted meanwhile
        lost_in_truncate.append(n)
        real_truncate(session_id, n, **kw)

    def lose(i: int) -> None:
        if i == 2:  # (i): before the run of step 2's rows
            pool.servicers[0].store.release("r")
        if i == 3:  # (ii): during step 3's rollback
            client.truncate = lossy_truncate
        if i == 4:
            client.truncate = real_truncate

    try:
        got = _run_with_rollbacks(model, cloud, pool, "r", lose)
        assert got == want
        assert lost_in_truncate == [len(PROMPT) + 3]
        assert cloud.kv_rebuilds == 2 and cloud.rebuilds == 2
    finally:
        cloud.release("r")
        client.close()
