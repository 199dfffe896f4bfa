"""The log write of a token request's rows overlaps the catch-up forward (real Redis, tiny
model), yet is durable before the answer; a failed overlapped write never lets an answer
out on rows that were not logged: the session leaves memory and the request runs again
with its writes in line."""

from __future__ import annotations

import threading
import time

import pytest

from services.cloud_ctx.context_manager import CloudContextManager, TokenAsk
from services.cloud_ctx.runner import LocalRunner
from services.cloud_ctx.session_log import LogUnavailable, SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft, Speculation
from tandem.transport.hidden import encode_hidden
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129, 7]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []  # (event, thread name)
        self.forward_started = threading.Event()

    def add(self, what: str) -> None:
        with self.lock:
            self.seen.append((what, threading.current_thread().name))

    def names(self) -> list[str]:
        return [w for w, _ in self.seen]


class WatchedLog(SessionLog):
    """A real SessionLog whose appends wait (bounded) for the forward to start, so they
    finish only after it when they run beside it; `fail` makes appends raise."""

    events: Events
    fail: Exception | None = None
    fail_times = 0
    fail_for: set[str] | None = None  # None: every session

    def append(self, session_id, start_pos, payload):
        self.events.add("append start")
        if self.fail_times and (self.fail_for is None or session_id in self.fail_for):
            self.fail_times -= 1
            raise self.fail
        self.events.forward_started.wait(0.5)
        time.sleep(0.05)
        n = super().append(session_id, start_pos, payload)
        self.events.add("append durable")
        return n

    def record_token(self, session_id, last, *args, **kwargs):
        self.events.add("record")
        return super().record_token(session_id, last, *args, **kwargs)


class WatchedRunner(LocalRunner):
    def __init__(self, model, start, events: Events) -> None:
        super().__init__(model, start)
        self.events = events

    def run(self, batch):
        self.events.add("forward start")
        self.events.forward_started.set()
        out = super().run(batch)
        self.events.add("forward end")
        return out


def _cloud(model, client, prefix, overlap: bool, replica: str = "a"):
    events = Events()
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    log = WatchedLog(client, replica_id=replica, ttl_s=60, prefix=prefix)
    log.events = events
    runner = WatchedRunner(model, SPLIT, events)
    cloud = CloudContextManager(model, SPLIT, store, log, runner, overlap_log=overlap)
    return cloud, log, events


def _run(cloud, edge: EdgeHalf, sid: str, n: int, first: bool = True) -> list[int]:
    """n tokens, each request carrying its row; `first`: the prompt comes first (all but
    its last row uploaded), else the session goes on after `edge.last`."""
    out = []
    for i in range(n):
        if first and i == 0:
            h = edge.hidden(PROMPT)
            cloud.upload(sid, 0, encode_hidden(h[:-1], "fp16"))
            rows = h[-1:]
        else:
            rows = edge.hidden([edge.last])
        token = cloud.next_token(sid, edge.length - 1, GREEDY, encode_hidden(rows, "fp16")).token
        out.append(token)
        edge.last = token
    return out


def _uninterrupted(model, client, prefix) -> list[int]:
    cloud, _, _ = _cloud(model, client, prefix + "ref:", overlap=False)
    try:
        return _run(cloud, EdgeHalf(model, SPLIT), "ref", GREEDY.max_tokens)
    finally:
        cloud.close()


def test_overlapped_append_runs_beside_the_forward_and_is_durable_before_the_answer(
    model, redis_client, redis_prefix
):
    expected = _uninterrupted(model, redis_client, redis_prefix)
    cloud, log, events = _cloud(model, redis_client, redis_prefix, overlap=True)
    edge = EdgeHalf(model, SPLIT)
    h = edge.hidden(PROMPT)
    cloud.upload("s", 0, encode_hidden(h[:-1], "fp16"))
    events.seen.clear()
    events.forward_started.clear()
    pos = len(PROMPT) - 1
    token = cloud.next_token("s", pos, GREEDY, encode_hidden(h[-1:], "fp16")).token
    names = events.names()
    # the append started before the forward and became durable after it had started ...
    assert names.index("append start") < names.index("forward start")
    assert names.index("forward start") < names.index("append durable")
    assert dict(events.seen)["append start"] == dict(events.seen)["append durable"]
    assert dict(events.seen)["append durable"].startswith("cloud-log")
    # ... and before the answer was recorded and returned; Redis holds the asked row
    assert names.index("append durable") < names.index("record")
    session_key, _ = log.keys("s")
    assert int(redis_client.hget(session_key, "uploaded")) == pos + 1
    edge.last = token
    rest = _run(cloud, edge, "s", GREEDY.max_tokens - 1, first=False)
    assert [token, *rest] == expected
    assert cloud.overlap_retries == 0
    cloud.close()


def test_serial_log_appends_before_the_forward(model, redis_client, redis_prefix):
    cloud, _, events = _cloud(model, redis_client, redis_prefix, overlap=False)
    edge = EdgeHalf(model, SPLIT)
    h = edge.hidden(PROMPT)
    cloud.upload("s", 0, encode_hidden(h[:-1], "fp16"))
    events.seen.clear()
    cloud.next_token("s", len(PROMPT) - 1, GREEDY, encode_hidden(h[-1:], "fp16"))
    names = events.names()
    assert names.index("append durable") < names.index("forward start")
    assert all(thread == threading.current_thread().name for _, thread in events.seen)


def test_a_failed_overlapped_append_reruns_the_request_in_line_with_the_same_answer(
    model, redis_client, redis_prefix
):
    expected = _uninterrupted(model, redis_client, redis_prefix)
    cloud, log, _ = _cloud(model, redis_client, redis_prefix, overlap=True)
    edge = EdgeHalf(model, SPLIT)
    first = _run(cloud, edge, "s", 2)
    log.fail, log.fail_times = LogUnavailable("Redis blinked"), 1
    rest = _run(cloud, edge, "s", GREEDY.max_tokens - 2, first=False)
    assert first + rest == expected
    assert cloud.overlap_retries == 1
    assert cloud.rebuilds == 1  # it left memory; the in-line run rebuilt it from the log
    cloud.close()


def test_ownership_moved_during_the_forward_is_caught_before_the_answer(
    model, redis_client, redis_prefix
):
    """Replica b takes the session over between a's requests: a's overlapped append is
    refused, a answers only after claiming it back and logging in line."""
    expected = _uninterrupted(model, redis_client, redis_prefix)
    a, _, _ = _cloud(model, redis_client, redis_prefix, overlap=True, replica="a")
    b, b_log, _ = _cloud(model, redis_client, redis_prefix, overlap=True, replica="b")
    edge = EdgeHalf(model, SPLIT)
    first = _run(a, edge, "s", 2)
    assert b_log.claim("s") is not None  # b owns it now; a still holds it in memory
    rest = _run(a, edge, "s", GREEDY.max_tokens - 2, first=False)
    assert first + rest == expected
    assert a.overlap_retries == 1 and a.rebuilds == 1
    a.close()
    b.close()


def test_a_batch_answers_the_others_when_one_sessions_log_is_down(
    model, redis_client, redis_prefix
):
    cloud, log, _ = _cloud(model, redis_client, redis_prefix, overlap=True)
    edges = {sid: EdgeHalf(model, SPLIT) for sid in ("x", "y")}
    hs = {}
    for sid, edge in edges.items():
        hs[sid] = edge.hidden(PROMPT)
        cloud.upload(sid, 0, encode_hidden(hs[sid][:-1], "fp16"))
    log.fail, log.fail_times, log.fail_for = LogUnavailable("Redis down"), 99, {"x"}
    pos = len(PROMPT) - 1
    asks = [TokenAsk(sid, pos, GREEDY, encode_hidden(hs[sid][-1:], "fp16")) for sid in ("x", "y")]
    x, y = cloud.next_tokens(asks)
    assert isinstance(x, LogUnavailable)
    # the copy whose KV ran on the unlogged row is gone; memory holds what the log holds
    assert cloud.store.get("x").uploaded == pos and cloud.rebuilds == 1
    assert cloud.overlap_retries == 1
    assert not isinstance(y, Exception) and cloud.store.get("y").uploaded == pos + 1
    cloud.close()


def test_a_speculative_upload_logs_beside_its_forward_and_before_judging(
    model, redis_client, redis_prefix
):
    """A rejected draft truncates the log, so the overlapped append must land first; a
    failed append reruns the upload in line, with the same verdict."""
    want = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    wrong = (want[0] + 1) % model.cfg.vocab_size
    p = len(PROMPT)
    verdicts = []
    for fail in (False, True):
        cloud, log, events = _cloud(model, redis_client, f"{redis_prefix}{fail}:", overlap=True)
        if fail:
            log.fail, log.fail_times = LogUnavailable("Redis blinked"), 1
        rows = EdgeHalf(model, SPLIT).hidden([*PROMPT, wrong])
        spec = Speculation(0, GREEDY, (Draft(p - 1, wrong), Draft(p, 3)))
        held, verdict = cloud.speculate("s", 0, encode_hidden(rows, "fp16"), spec)
        assert verdict.epoch == 1 and verdict.rollback.token == want[0]
        assert held == verdict.checked == p
        assert log.touch("s") == p  # appended, then truncated after the rejected draft
        names = events.names()
        if not fail:
            assert names.index("append start") < names.index("forward start")
            assert names.index("forward start") < names.index("append durable")
        assert cloud.overlap_retries == int(fail)
        verdicts.append((held, verdict.epoch, verdict.checked, verdict.rollback.token))
        cloud.close()
    assert verdicts[0] == verdicts[1]
