"""RoutedEngine over fake expert engines: the MoE² path end to end below HTTP (selection,
fine level, k > 1 vote, failover mid-run, streaming failover, budget checks, telemetry and the
report). The experts are `FakeEngine`s (no models): what is under test is the routing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.router.budget import BudgetDefaults, RequestBudget
from services.router.expert_engine import ExpertUnavailable
from services.router.moe2 import BudgetInfeasible
from services.router.routed_engine import RouteContext, RoutedEngine, route_context
from tandem.runtime.engine_api import ChatMessage, GenerationChunk, GenerationRequest
from tandem.runtime.sampling import SamplingParams
from tests.api.fakes import FakeEngine
from tests.services.router.moe2_fixtures import ClusterFeaturizer, predictor, selector
from tests.services.router.test_gate import EXPERTS

REPLIES = {"prose_pro": "Once upon a time. ", "code_pro": "def f(): pass ", "meh": "Well. "}


def fakes(**kwargs: dict) -> dict[str, FakeEngine]:
    return {e: FakeEngine(reply=REPLIES[e], model_id=e, **kwargs.get(e, {})) for e in EXPERTS}


def auto(experts: dict[str, FakeEngine], **kw) -> RoutedEngine:
    sel = selector()
    return RoutedEngine(
        "auto", experts, sel.predictor, selector=sel, featurizer=ClusterFeaturizer(), **kw
    )


def request(text: str, max_tokens: int = 8) -> GenerationRequest:
    msgs = (ChatMessage("user", text),)
    return GenerationRequest(
        "req-1", tuple(text.encode()), SamplingParams(max_tokens=max_tokens), chat_messages=msgs
    )


async def run(
    engine: RoutedEngine, req: GenerationRequest, *, stream: bool, **budget
) -> tuple[list[GenerationChunk], RouteContext]:
    b = {"latency_ms": None, "energy_j": None, "best_effort": False, "top_k": 1} | budget
    ctx = RouteContext(RequestBudget(**b), stream=stream)
    token = route_context.set(ctx)
    try:
        chunks = [c async for c in engine.generate(req)]
    finally:
        route_context.reset(token)
    return chunks, ctx


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_routes_prose_and_code_to_their_experts_and_reports(stream: bool) -> None:
    experts = fakes()
    engine = auto(experts)
    chunks, ctx = asyncio.run(run(engine, request("tell me a story"), stream=stream))
    assert text(chunks) == REPLIES["prose_pro"]
    report = ctx.report
    assert report is not None and report.answered_by == "prose_pro"
    assert report.selection == "auto" and set(report.subset) <= set(EXPERTS)
    assert report.experts == ["prose_pro"] and report.failed == []
    assert report.energy_j > 0 and report.latency_predicted_ms > 0
    assert report.latency_ms is not None and report.latency_ms > 0
    assert chunks[-1].report == report.usage()
    chunks, ctx = asyncio.run(run(engine, request("write python code"), stream=stream))
    assert text(chunks) == REPLIES["code_pro"] and ctx.report.answered_by == "code_pro"
    # every finished call fed the latency telemetry
    assert {s.expert_id for s in engine.predictor.telemetry.snapshot()} == {"prose_pro", "code_pro"}


def test_top_k_runs_experts_in_parallel_and_votes() -> None:
    experts = fakes()
    engine = auto(experts)
    chunks, ctx = asyncio.run(run(engine, request("tell me a story"), stream=False, top_k=3))
    r = ctx.report
    assert r.top_k == min(3, len(r.subset)) >= 2, "the coarse level should keep >= 2 experts"
    assert r.aggregation == "gate-weighted plurality vote"
    assert sorted(r.experts) == sorted(r.subset)
    assert all(len(experts[e].requests) == 1 for e in r.subset)
    # The answers all differ, so the top-weighted expert's answer wins.
    top = max(r.weights, key=r.weights.get)
    assert r.answered_by == top and text(chunks) == REPLIES[top]
    # Every expert that answered is charged energy.
    _, single = asyncio.run(run(auto(fakes()), request("tell me a story"), stream=False))
    assert r.energy_j > single.report.energy_j


def test_non_streaming_fails_over_mid_generation_within_the_subset() -> None:
    experts = fakes(prose_pro={"fail_after": 2})
    chunks, ctx = asyncio.run(run(auto(experts), request("tell me a story"), stream=False))
    r = ctx.report
    assert r.failed == ["prose_pro"] and r.answered_by != "prose_pro"
    assert r.answered_by in r.subset and text(chunks) == REPLIES[r.answered_by]
    assert r.budget_met


def test_streaming_fails_over_before_the_first_chunk_only() -> None:
    experts = fakes(prose_pro={"overloaded": True})
    chunks, ctx = asyncio.run(run(auto(experts), request("tell me a story"), stream=True))
    assert ctx.report.failed == ["prose_pro"] and text(chunks) == REPLIES[ctx.report.answered_by]

    experts = fakes(prose_pro={"fail_after": 2})
    with pytest.raises(RuntimeError, match="fake engine failure"):
        asyncio.run(run(auto(experts), request("tell me a story"), stream=True))


def test_every_expert_failing_is_unavailable() -> None:
    experts = fakes(**{e: {"overloaded": True} for e in EXPERTS})
    with pytest.raises(ExpertUnavailable, match="every expert tried failed"):
        asyncio.run(run(auto(experts), request("tell me a story"), stream=False))


def test_direct_expert_budget_check_and_best_effort() -> None:
    experts = fakes()
    engine = RoutedEngine("code_pro", experts, predictor())
    with pytest.raises(BudgetInfeasible) as exc:
        asyncio.run(run(engine, request("hi"), stream=False, latency_ms=1))
    assert exc.value.param == "latency_ms" and exc.value.code == "budget_infeasible"
    chunks, ctx = asyncio.run(
        run(engine, request("hi"), stream=False, latency_ms=1, best_effort=True)
    )
    assert text(chunks) == REPLIES["code_pro"]
    assert ctx.report.selection == "direct" and not ctx.report.budget_met
    assert experts["prose_pro"].requests == []


def test_defaults_apply_without_a_route_context() -> None:
    engine = RoutedEngine("meh", fakes(), predictor(), defaults=BudgetDefaults(latency_ms=1))
    with pytest.raises(BudgetInfeasible):
        asyncio.run(_drain(engine.generate(request("hi"))))


async def _drain(it: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [c async for c in it]


def test_closing_the_stream_aborts_every_running_expert() -> None:
    experts = fakes(**{e: {"block_after": 1} for e in EXPERTS})

    async def body() -> None:
        engine = auto(experts)
        ctx = RouteContext(RequestBudget(None, None, False, 3), stream=False)
        token = route_context.set(ctx)
        try:
            it = engine.generate(request("tell me a story"))
            task = asyncio.create_task(anext(it))
            while ctx.report is None:
                await asyncio.sleep(0.01)
            running = [experts[e] for e in ctx.report.experts]
            assert len(running) >= 2
            await asyncio.wait_for(asyncio.gather(*(e.blocked.wait() for e in running)), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(it.aclose(), 5)
        finally:
            route_context.reset(token)
        for e in running:
            assert e.aborted == ["req-1"]

    asyncio.run(body())


def test_when_every_member_of_the_subset_fails_a_fallback_within_budget_answers() -> None:
    sel = selector()
    b = RequestBudget(None, None, False, 2)
    from services.router.predictor import Shape

    coarse = sel.coarse(b, Shape.estimate(len("tell me a story") + 8, 8))
    assert coarse.fallbacks, "the fixture should leave an expert outside S"
    experts = fakes(**{e: {"fail_after": 1} for e in coarse.subset})
    chunks, ctx = asyncio.run(run(auto(experts), request("tell me a story"), stream=False, top_k=2))
    r = ctx.report
    assert sorted(r.failed) == sorted(coarse.subset)
    assert r.answered_by == coarse.fallbacks[0] and r.budget_met
    assert text(chunks) == REPLIES[r.answered_by]
