"""Router admission control over a real uvicorn router (FakeEngines that block mid-answer):
a bounded number of requests in flight, in total and per client; beyond either bound 429
with Retry-After at once (never a queue, never a hang); slots come back when responses end,
streams included; refusals are counted in /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from services.router.admission import AdmissionLimits
from services.router.app import build_router_app
from services.router.experts import ExpertConfig
from services.router.replicas import ReplicaTable
from tests.api.fakes import FakeEngine
from tests.api.live_server import live_server
from tests.services.router.test_app import cpu_predictor

EXPERT = "meh"


@contextmanager
def router(limits: AdmissionLimits, engine: FakeEngine) -> Iterator[str]:
    table = ReplicaTable([ExpertConfig(EXPERT, "edge", ("127.0.0.1:1",), "cpu")])
    app = build_router_app({EXPERT: engine}, table, cpu_predictor(EXPERT), admission=limits)
    with live_server(app) as base:
        yield base


def body(stream: bool = False) -> dict:
    return {"model": EXPERT, "prompt": "hi", "max_tokens": 4, "stream": stream}


def wait_in_flight(base: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while f"tandem_router_in_flight {float(n)}" not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < deadline, f"never {n} in flight"
        time.sleep(0.02)


def test_full_router_and_greedy_client_get_429_and_slots_come_back() -> None:
    engine = FakeEngine(model_id=EXPERT, block_after=1)  # answers one token, then hangs
    limits = AdmissionLimits(max_in_flight=3, max_per_client=2, trust_client_header=True)
    with router(limits, engine) as base, httpx.Client(timeout=30) as c, ExitStack() as held:

        def hold(client: str) -> None:
            r = held.enter_context(
                c.stream(
                    "POST",
                    f"{base}/v1/completions",
                    json=body(True),
                    headers={"x-tandem-client": client},
                )
            )
            assert r.status_code == 200

        def ask(client: str) -> httpx.Response:
            return c.post(
                f"{base}/v1/completions", json=body(), headers={"x-tandem-client": client}
            )

        hold("alice")
        hold("alice")
        wait_in_flight(base, 2)
        # alice has her share: 429 at once, with Retry-After
        r = ask("alice")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_requests_per_client"
        # bob may still come in; then the router is full for everybody
        hold("bob")
        wait_in_flight(base, 3)
        r = ask("carol")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        metrics = c.get(f"{base}/metrics").text
        assert 'tandem_router_admission_refused_total{reason="per_client"} 1.0' in metrics
        assert 'tandem_router_admission_refused_total{reason="router_full"} 1.0' in metrics
        # the three clients hang up: every slot comes back, and carol gets in
        held.close()
        wait_in_flight(base, 0)
        engine.block_after = None
        assert ask("carol").status_code == 200


def test_slots_return_after_complete_responses_and_streams() -> None:
    engine = FakeEngine(model_id=EXPERT)
    limits = AdmissionLimits(max_in_flight=1, max_per_client=1)
    with router(limits, engine) as base, httpx.Client(timeout=30) as c:
        for stream in (False, True, False, True):
            r = c.post(f"{base}/v1/completions", json=body(stream))
            assert r.status_code == 200
        assert "tandem_router_in_flight 0.0" in c.get(f"{base}/metrics").text
        # a client error frees its slot too
        assert c.post(f"{base}/v1/completions", json={"model": EXPERT}).status_code == 400
        assert c.post(f"{base}/v1/completions", json=body()).status_code == 200


def test_disconnected_stream_frees_its_slot() -> None:
    engine = FakeEngine(model_id=EXPERT, block_after=1)
    limits = AdmissionLimits(max_in_flight=1, max_per_client=1)
    with router(limits, engine) as base:
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{base}/v1/completions", json=body(True)) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first event arrived; now the client goes away
        deadline = time.monotonic() + 10
        while "tandem_router_in_flight 0.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline, "the slot of a gone client was not freed"
            time.sleep(0.05)
        assert engine.aborted  # and the engine dropped the request


def test_ten_times_capacity_is_refused_at_once_and_memory_stays_bounded() -> None:
    """Rounds of 10x the router's capacity in concurrent requests: the excess gets 429 at
    once (no queue builds up anywhere), every round finishes, and the process's memory does
    not grow from round to round."""
    import asyncio

    import psutil

    capacity = 8
    engine = FakeEngine(model_id=EXPERT, token_delay_s=0.01)
    limits = AdmissionLimits(max_in_flight=capacity, max_per_client=capacity)
    rss: list[int] = []

    async def round_(base: str) -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as c:

            async def one(i: int) -> int:
                r = await c.post(f"{base}/v1/completions", json=body(stream=i % 2 == 0))
                return r.status_code

            return await asyncio.gather(*(one(i) for i in range(10 * capacity)))

    with router(limits, engine) as base:
        for _ in range(6):
            statuses = asyncio.run(round_(base))
            assert set(statuses) <= {200, 429} and statuses.count(429) > 0, statuses
            assert statuses.count(200) >= capacity
            rss.append(psutil.Process().memory_info().rss)
        assert "tandem_router_in_flight 0.0" in httpx.get(f"{base}/metrics").text
    growth = rss[-1] - rss[1]  # after the first round has warmed everything up
    assert growth < 30 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 4 rounds of 10x load"
