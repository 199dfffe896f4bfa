"""Sessions rebuilt from the Redis log (real Redis, tiny model): after a restart, an
eviction or a move to another replica the tokens equal an uninterrupted run, the rebuild
is one batched catch-up, and NOT_FOUND (UnknownSession) is left for sessions with no log."""

from __future__ import annotations

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.session_log import LogUnavailable, SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits, UnknownSession
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import HiddenPayload, encode_hidden
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129, 7]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


class Edge:
    """The edge side: runs layers [0, split), sends fp16 payloads, one token at a time."""

    def __init__(self, model, sid: str = "s", params: SamplingParams = GREEDY) -> None:
        self.half = EdgeHalf(model, SPLIT)
        self.sid, self.params = sid, params
        self.tokens: list[int] = []

    def _wire(self, ids: list[int]) -> HiddenPayload:
        return encode_hidden(self.half.hidden(ids), "fp16")

    def start(self, cloud: CloudContextManager) -> None:
        """Upload the prompt but its last position; that one rides in the first request."""
        cloud.upload(self.sid, 0, self._wire(PROMPT[:-1]))
        self._pending = PROMPT[-1:]

    def step(self, cloud: CloudContextManager) -> int:
        pos = self.half.length
        result = cloud.next_token(self.sid, pos, self.params, self._wire(self._pending))
        self.tokens.append(result.token)
        self._pending = [result.token]
        self.last_catch_up = result.catch_up_rows
        return result.token


def _cloud(model, client=None, prefix="", replica="a", **limits) -> CloudContextManager:
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits(**limits))
    log = None
    if client is not None:
        log = SessionLog(client, replica_id=replica, ttl_s=store.limits.ttl_s, prefix=prefix)
    return CloudContextManager(model, SPLIT, store, log)


def _uninterrupted(model, params=GREEDY, n=GREEDY.max_tokens) -> list[int]:
    cloud, edge = _cloud(model), Edge(model, params=params)
    edge.start(cloud)
    for _ in range(n):
        edge.step(cloud)
    return edge.tokens


def test_restart_rebuilds_from_the_log_and_tokens_equal_an_uninterrupted_run(
    model, redis_client, redis_prefix
):
    expected = _uninterrupted(model)
    edge = Edge(model)
    first = _cloud(model, redis_client, redis_prefix, "a")
    edge.start(first)
    for _ in range(4):
        edge.step(first)
    del first  # the process is gone; only Redis remembers
    second = _cloud(model, redis_client, redis_prefix, "b")
    edge.step(second)  # no re-upload: the asked row rides in the request as usual
    assert second.rebuilds == 1
    # one batched catch-up: every logged position plus the asked one
    assert edge.last_catch_up == len(PROMPT) + 4
    while len(edge.tokens) < GREEDY.max_tokens:
        edge.step(second)
    assert edge.tokens == expected
    registry_key = second.log.keys("s")[0]
    assert redis_client.hget(registry_key, "owner") == b"b"
    assert int(redis_client.hget(registry_key, "uploaded")) == len(PROMPT) + 9


def test_lru_evicted_session_comes_back_from_the_log(model, redis_client, redis_prefix):
    expected = _uninterrupted(model, n=6)
    cloud = _cloud(model, redis_client, redis_prefix, max_sessions=1)
    a, b = Edge(model, "a"), Edge(model, "b")
    a.start(cloud)
    a.step(cloud)
    b.start(cloud)  # evicts a from memory; a's log stays
    assert cloud.store.evictions["lru"] == 1
    while len(a.tokens) < 6:
        a.step(cloud)
    assert a.tokens == expected and cloud.rebuilds == 1


def test_session_moves_between_replicas_and_back(model, redis_client, redis_prefix):
    expected = _uninterrupted(model, n=6)
    a = _cloud(model, redis_client, redis_prefix, "a")
    b = _cloud(model, redis_client, redis_prefix, "b")
    edge = Edge(model)
    edge.start(a)
    edge.step(a)
    edge.step(b)  # b rebuilds and owns it now
    edge.step(b)
    edge.step(a)  # a's memory copy is stale: it finds out at its write and rebuilds
    assert a.store.evictions["stale"] == 1 and a.rebuilds == 1
    edge.step(a)
    edge.step(a)
    assert edge.tokens == expected


def test_seeded_sampling_continues_the_same_stream_after_a_restart(
    model, redis_client, redis_prefix
):
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=7, ignore_eos=True)
    expected = _uninterrupted(model, params, n=8)
    edge = Edge(model, params=params)
    first = _cloud(model, redis_client, redis_prefix, "a")
    edge.start(first)
    for _ in range(3):
        edge.step(first)
    second = _cloud(model, redis_client, redis_prefix, "b")
    while len(edge.tokens) < 8:
        edge.step(second)
    assert edge.tokens == expected


def test_a_retried_request_gets_the_same_answer_even_after_a_restart(
    model, redis_client, redis_prefix
):
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    first = _cloud(model, redis_client, redis_prefix, "a")
    half = EdgeHalf(model, SPLIT)
    h = encode_hidden(half.hidden(PROMPT), "fp16")
    pos = len(PROMPT) - 1
    answer = first.next_token("s", pos, params, h)
    again = first.next_token("s", pos, params, h)  # the reply was lost; the edge resends
    assert (again.token, again.prob, again.catch_up_rows) == (answer.token, answer.prob, 0)
    second = _cloud(model, redis_client, redis_prefix, "b")
    after_restart = second.next_token("s", pos, params)
    assert (after_restart.token, after_restart.prob) == (answer.token, answer.prob)


def test_not_found_only_without_a_log(model, redis_client, redis_prefix):
    cloud = _cloud(model, redis_client, redis_prefix)
    with pytest.raises(UnknownSession):
        cloud.next_token("never", 0, GREEDY)
    edge = Edge(model)
    edge.start(cloud)
    edge.step(cloud)
    assert cloud.release("s")
    assert redis_client.exists(*cloud.log.keys("s")) == 0
    with pytest.raises(UnknownSession):
        _cloud(model, redis_client, redis_prefix, "b").next_token("s", len(PROMPT), GREEDY)


def test_in_memory_only_manager_still_forgets_on_restart(model):
    edge = Edge(model)
    edge.start(_cloud(model))
    with pytest.raises(UnknownSession):
        _cloud(model).next_token("s", len(PROMPT) - 1, GREEDY)


def test_redis_down_acknowledges_nothing(model):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    cloud = _cloud(model, dead, "x:")
    with pytest.raises(LogUnavailable):
        cloud.upload("s", 0, torch.zeros(2, model.cfg.hidden_size))
    assert "s" not in cloud.store
