"""Token-level mixing served over the edge gRPC Mix RPC on a tiny random model pair (same
byte tokenizer): the router's mixture equals the mixture computed offline from the models,
it streams, and it fails over when an expert dies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math

import grpc
import pytest
import torch

from services.edge_node.engine import EdgeEngine, EngineConfig
from services.router.report import RouteReport
from services.router.token_mixture import (
    AGGREGATION,
    GrpcMixStream,
    MixResult,
    NextToken,
    mix,
    mix_generate,
)
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.sampling import SamplingParams
from tandem_proto.edge.v1 import edge_pb2_grpc
from tests.services.router.tiny_edges import tiny_edge_servers
from tests.tiny import ByteCodec, tiny_model

PROMPT = "mixing experts"
WEIGHTS = {"a": 0.3, "b": 0.7}
PARAMS = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def models():
    return {"a": tiny_model("qwen2", seed=0), "b": tiny_model("qwen2", seed=1)}


@contextlib.asynccontextmanager
async def cluster(models):
    async with tiny_edge_servers(models, max_context=128) as servers:
        channels = {n: grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for n, s in servers.items()}
        try:
            yield {n: edge_pb2_grpc.EdgeNodeStub(c) for n, c in channels.items()}, servers
        finally:
            for c in channels.values():
                await c.close()


def streams(stubs, top_k: int = 0):
    return {
        n: GrpcMixStream(s, prompt=PROMPT, params=PARAMS, top_k=top_k, timeout=30)
        for n, s in stubs.items()
    }


@torch.inference_mode()
def offline_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next | ids[:i+1]) for every i, computed directly with the model, [n, V]."""
    h = model.run_sequence(model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, model.cfg.n_layers)
    return torch.log_softmax(model.logits(h).double(), dim=-1)


def offline_mixture(models, prompt_ids, tokens, top_k: int = 0) -> list[torch.Tensor]:
    """The gate-weighted mixture of the models' next-token distributions at every
    generated position (over the whole vocabulary; truncated to each model's top-k and
    renormalised when top_k > 0), [V] log-probabilities each."""
    seq = list(prompt_ids) + list(tokens)
    lp = {n: offline_logprobs(m, seq)[len(prompt_ids) - 1 : -1] for n, m in models.items()}
    out = []
    for i in range(len(tokens)):
        acc = torch.full_like(lp["a"][i], -math.inf)
        for n, w in WEIGHTS.items():
            row = lp[n][i]
            if top_k:
                keep = torch.full_like(row, -math.inf)
                idx = row.topk(top_k).indices
                keep[idx] = row[idx]
                row = keep
            acc = torch.logaddexp(acc, row + math.log(w))
        out.append(acc - torch.logsumexp(acc, 0))
    return out


def served_full(step, vocab: int) -> torch.Tensor:
    full = torch.full((vocab,), -math.inf, dtype=torch.float64)
    full[torch.tensor(step.ids)] = step.log_mix
    return full


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("top_k", [0, 8])
def test_served_mixture_equals_the_offline_mixture(models, top_k: int) -> None:
    async def body():
        async with cluster(models) as (stubs, _):
            result, report = MixResult(), RouteReport("auto", {})
            chunks = [
                c
                async for c in mix_generate(
                    streams(stubs, top_k),
                    WEIGHTS,
                    PARAMS,
                    report=report,
                    result=result,
                    energy_j={"a": 1.5, "b": 4.0},
                )
            ]
            return chunks, result, report

    chunks, result, report = run(body())
    tokens = [s.token for s in result.steps]
    assert [t for c in chunks for t in c.token_ids] == tokens
    assert len(tokens) == PARAMS.max_tokens and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == ByteCodec().decode(tokens)
    assert report.aggregation == AGGREGATION and report.energy_j == pytest.approx(5.5)
    assert report.answered_by == "b" and not report.failed
    want = offline_mixture(models, ByteCodec().encode(PROMPT), tokens, top_k)
    vocab = want[0].numel()
    for step, w in zip(result.steps, want, strict=True):
        got = served_full(step, vocab)
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(got))
        # float32 logits on the wire vs float64 offline: equal to ~1e-5 in log space.
        torch.testing.assert_close(got[finite], w[finite], atol=2e-5, rtol=0)
        assert step.logprob == pytest.approx(float(w[step.token]), abs=2e-5)
    # The mixture is not either model alone (the test could fail).
    solo = offline_logprobs(models["b"], ByteCodec().encode(PROMPT) + tokens)
    assert (
        served_full(result.steps[0], vocab) - solo[len(ByteCodec().encode(PROMPT)) - 1]
    ).abs().max() > 1e-2


def test_an_expert_dying_mid_stream_leaves_the_other_serving(models) -> None:
    async def body():
        async with cluster(models) as (stubs, servers):
            result, report = MixResult(), RouteReport("auto", {})
            got = []
            async for chunk in mix_generate(
                streams(stubs), WEIGHTS, PARAMS, report=report, result=result
            ):
                got.append(chunk)
                if len(got) == 3:
                    await servers["b"].stop(grace=None)  # the heavier expert dies
            return got, result, report

    chunks, result, report = run(body())
    assert len(chunks) == PARAMS.max_tokens and chunks[-1].finish_reason == "length"
    assert report.failed == ["b"] and result.failed == ["b"]
    assert result.steps[0].experts == ("b", "a")
    assert result.steps[-1].experts == ("a",)
    # After the failure the served distribution is expert a's alone, computed offline.
    tokens = [s.token for s in result.steps]
    prompt = ByteCodec().encode(PROMPT)
    lp = offline_logprobs(models["a"], prompt + tokens)[len(prompt) - 1 : -1]
    last = result.steps[-1]
    torch.testing.assert_close(served_full(last, lp.shape[1]), lp[-1], atol=2e-5, rtol=0)


def test_mix_truncated_union_renormalises() -> None:
    ids, log_mix = mix(
        {
            "a": NextToken((1, 2), (math.log(0.6), math.log(0.2))),
            "b": NextToken((2, 3), (math.log(0.5), math.log(0.5))),
        },
        {"a": 1.0, "b": 1.0},
    )
    p = dict(zip(ids, log_mix.exp().tolist(), strict=True))
    z = 0.3 + 0.1 + 0.25 + 0.25
    assert p == pytest.approx({1: 0.3 / z, 2: 0.35 / z, 3: 0.25 / z})


# -- the router serving it: RoutedEngine with k = 2 over experts that share a tokenizer ----


def test_routed_engine_serves_the_token_mixture_and_reports_energy(models) -> None:
    from services.router.budget import RequestBudget
    from services.router.routed_engine import RouteContext, RoutedEngine, route_context
    from services.router.token_mixture import EngineMixStream, TokenMixer
    from tests.api.fakes import FakeEngine
    from tests.services.router.moe2_fixtures import ClusterFeaturizer, selector
    from tests.services.router.test_gate import EXPERTS
    from tests.services.router.test_routed_engine import request

    # A seeded draw that ignores EOS: the tiny random models give EOS ~1/260 of the mass,
    # so an unseeded request ended after one token now and then.
    req = dataclasses.replace(
        request("tell me a story", 6), params=SamplingParams(max_tokens=6, seed=3, ignore_eos=True)
    )

    three = {**models, "c": tiny_model("qwen2", seed=2)}
    engines = {
        e: EdgeEngine(e, ExitDecoder(m), ByteCodec(), EngineConfig(max_context=128))
        for e, m in zip(EXPERTS, three.values(), strict=True)
    }
    opened: list[str] = []

    class Mixable(FakeEngine):
        def open_mix(self, req, top_k):
            opened.append(self.model_id)
            return EngineMixStream(engines[self.model_id], req, top_k)

    async def body(stream: bool):
        for e in engines.values():
            e.start()
        try:
            sel = selector()
            experts = {e: Mixable(reply="unused ", model_id=e) for e in EXPERTS}
            routed = RoutedEngine(
                "auto",
                experts,
                sel.predictor,
                selector=sel,
                featurizer=ClusterFeaturizer(),
                mixer=TokenMixer({e: "byte" for e in EXPERTS}, top_k=0),
            )
            ctx = RouteContext(RequestBudget(None, None, False, 2), stream=stream)
            token = route_context.set(ctx)
            try:
                chunks = [c async for c in routed.generate(req)]
            finally:
                route_context.reset(token)
            return chunks, ctx.report, sel.predictor
        finally:
            for e in engines.values():
                e.stop()

    for stream in (True, False):
        opened.clear()
        chunks, report, predictor = run(body(stream))
        assert report.aggregation == AGGREGATION and len(report.experts) == 2
        assert sorted(opened) == sorted(report.experts)
        ids = [t for c in chunks for t in c.token_ids]
        assert len(ids) == 6 and "unused" not in "".join(c.text for c in chunks)
        assert len(chunks) == (6 if stream else 1)
        from services.router.predictor import Shape

        shape = Shape(chunks[-1].prompt_tokens, 6)
        assert report.energy_j == pytest.approx(
            sum(predictor.energy_j(e, shape) for e in report.experts)
        )
        assert chunks[-1].report == report.usage()
