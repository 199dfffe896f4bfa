"""The k > 1 pick by the experts' own prompt scores (services/router/self_score.py): the
rule on synthetic rows, and served end to end (tiny models behind real edge gRPC servers,
the router's ExpertEngines, RoutedEngine) against the offline rule on the same prompts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from services.router.gate_prompts import GateItem
from services.router.safe_top1 import SafeTop1Config
from services.router.self_score import (
    AGGREGATION,
    FEATURES_PER_EXPERT,
    PromptScore,
    SelfRegressor,
    SelfScoreConfig,
    SelfScorePicks,
    SelfScoreTop1,
    SelfSupport,
)
from services.router.self_score_data import self_rows
from tandem.runtime.sampling import SamplingParams

LN2 = math.log(2)


def synthetic(n: int = 400, seed: int = 0):
    """Two experts; expert 1 continues better exactly where it also models the prompt
    better (its prompt NLL is lower), in every one of four domains."""
    rng = np.random.default_rng(seed)
    pchars = rng.integers(40, 100, n).astype(float)
    scores = np.zeros((n, 2, FEATURES_PER_EXPERT))
    good1 = rng.random(n) < 0.5
    for e in range(2):
        bpc = 1.2 + rng.normal(0, 0.05, n) + np.where(good1 == (e == 1), -0.3, 0.0)
        scores[:, e, 0] = bpc * pchars * LN2
        scores[:, e, 1] = pchars / 4
        scores[:, e, 2:] = rng.normal(0, 1, (n, 3))
    chars = np.full(n, 60)
    cont = np.stack([np.where(good1, 1.5, 1.0), np.where(good1, 1.0, 1.3)], 1)
    nll = (cont + rng.normal(0, 0.05, (n, 2))) * chars[:, None] * LN2
    domains = [f"d{i % 4}" for i in range(n)]
    return scores, pchars, nll, chars, domains, good1


def test_the_pick_follows_the_prompt_scores_and_falls_back_to_the_prior() -> None:
    scores, pchars, nll, chars, domains, good1 = synthetic()
    feats = np.zeros((len(chars), 3))
    pick = SelfScoreTop1.fit(("a", "b"), feats, scores, pchars, nll, chars, domains)
    assert pick.prior == "b" and math.isfinite(pick.tau)
    test, _, _, _, _, truth = synthetic(seed=1)
    chosen = pick.choose_rows(None, test, pchars)
    assert np.mean([(c == "b") == t for c, t in zip(chosen, truth, strict=True)]) > 0.9
    one = {e: PromptScore(*test[0, i]) for i, e in enumerate(("a", "b"))}
    assert pick.choose(one, int(pchars[0])) == chosen[0]
    assert pick.choose({"a": one["a"], "b": None}, int(pchars[0])) == "b"  # no score: prior


def test_an_uninformative_score_keeps_the_prior() -> None:
    scores, pchars, nll, chars, domains, _ = synthetic()
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 1, scores.shape)  # unrelated to which expert continues better
    pick = SelfScoreTop1.fit(
        ("a", "b"), np.zeros((len(chars), 1)), noise, pchars, nll, chars, domains
    )
    chosen = pick.choose_rows(None, rng.normal(0, 1, scores.shape), pchars)
    assert chosen.count("b") / len(chosen) > 0.9


def test_state_round_trip_gives_the_same_picks(tmp_path) -> None:
    scores, pchars, nll, chars, domains, _ = synthetic()
    cfg = SelfScoreConfig(support=0.9)
    pick = SelfScoreTop1.fit(
        ("a", "b"), np.zeros((len(chars), 1)), scores, pchars, nll, chars, domains, cfg
    )
    picks = SelfScorePicks({frozenset(pick.experts): pick})
    picks.save(tmp_path / "p.json")
    back = SelfScorePicks.load(tmp_path / "p.json").get(("b", "a"))
    assert back is not None and back.tau == pick.tau
    assert back.choose_rows(None, scores, pchars) == pick.choose_rows(None, scores, pchars)


# -- served, on tiny models ---------------------------------------------------------------

EXPERT_SEEDS = {"prose_pro": 0, "code_pro": 1, "meh": 2}
PROMPTS = ("tell me about code", "a story of the sea", "zzzz qqq", "the the the the")


def lowest_prompt_bpc(experts: tuple[str, ...]) -> SelfScoreTop1:
    """A hand-made pick: predicted bits/char = the expert's prompt bits/char, tau 0 (the
    expert modelling the prompt best answers)."""
    n = len(experts) * FEATURES_PER_EXPERT
    coef = np.zeros((n + 1, len(experts)))
    for i in range(len(experts)):
        coef[i * FEATURES_PER_EXPERT, i] = 1.0
    reg = SelfRegressor(np.zeros(n), np.ones(n), None, coef)
    support = SelfSupport(np.zeros(n), np.eye(n), math.inf)
    cfg = SelfScoreConfig(safe=SafeTop1Config(support=1.0))
    return SelfScoreTop1(experts, experts[0], 0.0, reg, support, cfg)


def offline_scores(models, text: str) -> dict[str, np.ndarray]:
    """The offline path (`self_score_data.self_rows`, raw text) on each tiny model."""
    from tests.tiny import ByteCodec

    item = GateItem("test", "train", text, "", chat=True)
    return {
        e: self_rows(SimpleNamespace(model=m, codec=ByteCodec()), [item], raw=True)[0]
        for e, m in models.items()
    }


@pytest.fixture(scope="module")
def models():
    from tests.tiny import tiny_model

    return {e: tiny_model("qwen2", seed=s) for e, s in EXPERT_SEEDS.items()}


@contextlib.asynccontextmanager
async def edges(models):
    from tests.services.router.tiny_edges import tiny_edge_servers

    async with tiny_edge_servers(models, max_context=256) as servers:
        yield {e: f"127.0.0.1:{s.port}" for e, s in servers.items()}


def test_the_edge_returns_the_offline_prompt_score(models) -> None:
    from tandem.clients.edge import EdgeClient
    from tandem.runtime.engine_api import ChatMessage

    async def body():
        async with edges(models) as addr:
            out = {}
            for e, a in addr.items():
                async with EdgeClient(a) as client:
                    for text in PROMPTS:
                        chunks = [
                            c
                            async for c in client.generate(
                                messages=[ChatMessage("user", text)],
                                params=SamplingParams(max_tokens=3, temperature=0.0),
                                score_prompt=True,
                            )
                        ]
                        out[e, text] = chunks[-1].report["prompt_score"]
                    plain = [
                        c
                        async for c in client.generate(
                            prompt=PROMPTS[0], params=SamplingParams(max_tokens=2)
                        )
                    ]
                    assert "prompt_score" not in (plain[-1].report or {})
            return out

    served = asyncio.run(body())
    for text in PROMPTS:
        offline = offline_scores(models, text)
        for e in models:
            got = PromptScore(**served[e, text]).as_array()
            np.testing.assert_allclose(got, offline[e], rtol=1e-4, atol=1e-4)


def test_the_routed_k_gt_1_answer_is_the_offline_pick(models) -> None:
    from services.router.budget import RequestBudget
    from services.router.expert_engine import ExpertEngine
    from services.router.experts import ExpertConfig
    from services.router.replicas import EdgeProber, HealthMonitor, ReplicaTable
    from services.router.routed_engine import RouteContext, RoutedEngine, route_context
    from tandem.clients.edge import EdgeClient
    from tandem.runtime.engine_api import ChatMessage, GenerationRequest
    from tests.services.router.moe2_fixtures import ClusterFeaturizer, selector

    names = tuple(EXPERT_SEEDS)
    picks = SelfScorePicks(
        {
            frozenset(s): lowest_prompt_bpc(s)
            for r in (2, 3)
            for s in itertools.combinations(names, r)
        }
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def body():
        async with edges(models) as addr:
            table = ReplicaTable(
                [ExpertConfig(e, "edge", (a,), device="cpu") for e, a in addr.items()]
            )
            monitor = HealthMonitor(table, EdgeProber(timeout_s=2.0), interval_s=60)
            await monitor.check_once()  # replicas start unknown: one probe round
            experts = {e: ExpertEngine(e, table, max_context=256) for e in addr}
            sel = selector()
            routed = RoutedEngine(
                "auto",
                experts,
                sel.predictor,
                selector=sel,
                featurizer=ClusterFeaturizer(),
                picks=picks,
            )
            out = []
            for text in PROMPTS:
                msgs = (ChatMessage("user", text),)
                req = GenerationRequest("r", tuple(text.encode()), params, chat_messages=msgs)
                ctx = RouteContext(RequestBudget(None, None, False, 3), stream=False)
                token = route_context.set(ctx)
                try:
                    chunks = [c async for c in routed.generate(req)]
                finally:
                    route_context.reset(token)
                answers = {}
                for e in ctx.report.experts:
                    async with EdgeClient(addr[e]) as client:
                        got = [c async for c in client.generate(messages=list(msgs), params=params)]
                    answers[e] = "".join(c.text for c in got)
                out.append((text, ctx.report, "".join(c.text for c in chunks), answers))
            for e in experts.values():
                await e.close()
            await monitor.stop()
            return out

    results = asyncio.run(body())
    # The rule is not the vote in disguise: at least once it answers with another expert
    # than the gate's top-weight one (the vote's pick when the answers differ).
    assert any(r.answered_by != max(r.weights, key=r.weights.get) for _, r, _, _ in results)
    for text, report, served, answers in results:
        assert report.top_k > 1 and report.aggregation == AGGREGATION
        ran = tuple(e for e in names if e in report.experts)
        offline = offline_scores({e: models[e] for e in ran}, text)
        raw = np.stack([offline[e] for e in ran])[None]
        want = picks.get(ran).choose_rows(None, raw, np.array([len(text)]))[0]
        assert report.answered_by == want
        assert served == answers[want]


def test_without_scores_the_pick_serves_its_prior() -> None:
    """Experts that send no prompt score (a node that cannot score): the pick answers with
    its prior (when it ran), never a guess."""
    from services.router.budget import RequestBudget
    from services.router.routed_engine import RouteContext, RoutedEngine, route_context
    from tests.api.fakes import FakeEngine
    from tests.services.router.moe2_fixtures import ClusterFeaturizer, selector
    from tests.services.router.test_routed_engine import request

    names = tuple(EXPERT_SEEDS)
    picks = SelfScorePicks(
        {
            frozenset(s): lowest_prompt_bpc(s[::-1])  # prior: the last of the gate's order
            for r in (2, 3)
            for s in itertools.combinations(names, r)
        }
    )
    experts = {e: FakeEngine(reply=f"{e} says ", model_id=e) for e in names}
    sel = selector()
    routed = RoutedEngine(
        "auto", experts, sel.predictor, selector=sel, featurizer=ClusterFeaturizer(), picks=picks
    )

    async def body(text: str):
        ctx = RouteContext(RequestBudget(None, None, False, 3), stream=False)
        token = route_context.set(ctx)
        try:
            chunks = [c async for c in routed.generate(request(text))]
        finally:
            route_context.reset(token)
        return ctx.report, "".join(c.text for c in chunks)

    for text in PROMPTS:
        report, text_out = asyncio.run(body(text))
        assert report.aggregation == AGGREGATION
        prior = picks.get(report.experts).prior
        assert report.answered_by == prior and text_out.startswith(f"{prior} says")
