"""SessionLog against a real Redis: append + read back, registry fields, TTL and its
refresh, ownership fencing, answers kept for a rebuild, release, Redis unreachable."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.cloud_ctx.session_log import LogLost, LogUnavailable, OwnershipLost, SessionLog
from services.cloud_ctx.session_store import LastToken
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import encode_hidden


def _log(client, prefix, replica="a", ttl_s=60.0) -> SessionLog:
    return SessionLog(client, replica_id=replica, ttl_s=ttl_s, prefix=prefix)


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_append_and_claim_return_the_payloads_as_received(redis_client, redis_prefix):
    log = _log(redis_client, redis_prefix)
    first, second = encode_hidden(_rows(3), "fp16"), encode_hidden(_rows(2, 1), "int8")
    assert log.claim("s") is None  # nothing logged yet
    assert log.append("s", 0, first) == 3
    assert log.append("s", 3, second) == 5
    registry_key, log_key = log.keys("s")
    h = redis_client.hgetall(registry_key)
    assert h[b"owner"] == b"a" and h[b"uploaded"] == b"5" and h[b"encoding"] == b"int8"
    assert float(h[b"updated"]) == pytest.approx(time.time(), abs=60)
    assert 0 < redis_client.ttl(registry_key) <= 60 and 0 < redis_client.ttl(log_key) <= 60

    record = _log(redis_client, redis_prefix, replica="b").claim("s")
    assert record is not None
    assert record.payloads == ((0, first), (3, second))
    assert record.uploaded == 5 and record.previous_owner == "a"
    assert record.sampling is None and record.last is None
    assert redis_client.hget(registry_key, "owner") == b"b"


def test_appends_must_continue_the_log(redis_client, redis_prefix):
    log = _log(redis_client, redis_prefix)
    with pytest.raises(LogLost):  # a session the log never saw cannot start past 0
        log.append("s", 2, encode_hidden(_rows(1), "fp16"))
    log.append("s", 0, encode_hidden(_rows(2), "fp16"))
    with pytest.raises(OwnershipLost):  # the log holds 2 positions, not 5
        log.append("s", 5, encode_hidden(_rows(1), "fp16"))
    assert log.touch("s") == 2


def test_another_replica_claiming_fences_the_old_owner(redis_client, redis_prefix):
    a, b = _log(redis_client, redis_prefix, "a"), _log(redis_client, redis_prefix, "b")
    a.append("s", 0, encode_hidden(_rows(2), "fp16"))
    assert b.claim("s").uploaded == 2
    with pytest.raises(OwnershipLost) as lost:
        a.append("s", 2, encode_hidden(_rows(1), "fp16"))
    assert lost.value.owner == "b"
    with pytest.raises(OwnershipLost):
        a.touch("s")
    with pytest.raises(OwnershipLost):
        a.record_token("s", LastToken(1, 7, 0.5))
    assert b.append("s", 2, encode_hidden(_rows(1), "fp16")) == 3


def test_recorded_answer_and_sampler_state_come_back(redis_client, redis_prefix):
    log = _log(redis_client, redis_prefix)
    log.append("s", 0, encode_hidden(_rows(4), "fp16"))
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    state = torch.Generator().manual_seed(5).get_state().numpy().tobytes()
    log.record_token("s", LastToken(3, 42, 0.25), params, state)
    record = log.claim("s")
    assert record.last == LastToken(3, 42, 0.25)
    assert record.sampling == SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    assert record.sampler_state == state


def test_ttl_is_refreshed_on_use_and_the_session_expires_when_idle(redis_client, redis_prefix):
    log = _log(redis_client, redis_prefix, ttl_s=1)
    log.append("s", 0, encode_hidden(_rows(2), "fp16"))
    registry_key, log_key = log.keys("s")
    time.sleep(0.6)
    log.touch("s")  # refreshed: both keys live a full second again
    assert redis_client.pttl(registry_key) > 600 and redis_client.pttl(log_key) > 600
    time.sleep(1.2)
    assert log.claim("s") is None
    with pytest.raises(LogLost):
        log.touch("s")


def test_release_deletes_registry_and_log(redis_client, redis_prefix):
    log = _log(redis_client, redis_prefix)
    log.append("s", 0, encode_hidden(_rows(2), "fp16"))
    assert log.release("s")
    assert redis_client.exists(*log.keys("s")) == 0
    assert not log.release("s")
    assert log.claim("s") is None


def test_unreachable_redis_raises_log_unavailable():
    with socket_closed_port() as port:
        client = redis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        log = SessionLog(client, replica_id="a", ttl_s=60)
        assert not log.ping()
        with pytest.raises(LogUnavailable):
            log.append("s", 0, encode_hidden(_rows(1), "fp16"))
        with pytest.raises(LogUnavailable):
            log.claim("s")


def test_needs_a_binary_client(redis_url):
    with pytest.raises(ValueError):
        SessionLog(redis.Redis.from_url(redis_url, decode_responses=True), replica_id="a", ttl_s=1)


class socket_closed_port:
    """A loopback port nobody listens on (bound, never listening, for the block's life)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
