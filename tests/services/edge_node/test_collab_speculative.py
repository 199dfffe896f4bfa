"""Lossless collaboration (`collab="speculative"`) on tiny random models: an edge engine
drafts tokens at its split head, a real cloud context manager judges them over gRPC on
127.0.0.1, and the output must equal the full model's greedy decoding however the drafts
fall (a random exit rule makes many of them wrong, so many rollbacks happen)."""

from __future__ import annotations

import pytest
import torch

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import ExitDecision
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.runtime.test_decoder import _heads
from tests.services.edge_node.cloud_server import cloud_manager, cloud_server
from tests.services.edge_node.test_collab import _run
from tests.tiny import ByteCodec, tiny_model

SPLIT = 3
PROMPTS = ["the cloud checks", "drafts", "x", "a longer prompt that the edge prefills first"]


class CoinExits:
    """Confident with probability `rate`, whatever the logits say (seeded)."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, logits, shortlist, tau) -> ExitDecision:
        n = logits.shape[0]
        return ExitDecision(
            confident=torch.rand(n, generator=self.gen) < self.rate,
            token=shortlist[logits[:, :-1].argmax(-1)],
            prob=torch.ones(n),
        )


def _speculative(model, port: int, rate: float, seed: int = 0, **config):
    decoder = ExitDecoder(
        model,
        _heads(model, (SPLIT,)),
        exit_rule=CoinExits(rate, seed),
        depth=SPLIT,
    )
    link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}", timeout_s=10.0))
    link.start()
    engine = EdgeEngine(
        "tiny",
        decoder,
        ByteCodec(),
        EngineConfig(max_batch=4, max_context=128, tau=0.5, collab="speculative", **config),
        cloud=link,
    )
    engine.start()
    return engine, link


@pytest.mark.parametrize(("arch", "rate"), [("llama", 0.7), ("qwen2", 1.0), ("gemma3", 0.4)])
def test_greedy_output_equals_the_full_model_whatever_the_drafts(arch, rate):
    model = tiny_model(arch)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = ExitDecoder(model)
    expected = [list(generate(full, ByteCodec().encode(p), params).token_ids) for p in PROMPTS]
    manager = cloud_manager(model, SPLIT)
    with cloud_server(manager) as port:
        engine, link = _speculative(model, port, rate, max_drafts=6)
        try:
            got = _run(engine, PROMPTS, params)
        finally:
            engine.stop()
            link.close()
    assert [ids for ids, _ in got] == expected
    c = link.counters
    assert c.drafts_sent > 0 and c.rollbacks > 0  # the random drafts were wrong, often
    assert c.token_failures == 0
    assert all(s in ("edge", "cloud") for _, src in got for s in src)


def test_without_the_cloud_drafts_go_out_marked_as_fallback():
    model = tiny_model("llama")
    from tandem.launch import free_port

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    decoder = ExitDecoder(model, _heads(model, (SPLIT,)), exit_rule=CoinExits(0.5, 1), depth=SPLIT)
    link = CloudLink(
        CloudLinkConfig(target=f"127.0.0.1:{free_port()}", timeout_s=1.0, backoff_s=30.0)
    )
    link.start()
    engine = EdgeEngine(
        "tiny", decoder, ByteCodec(), EngineConfig(tau=0.5, collab="speculative"), cloud=link
    )
    engine.start()
    try:
        [(ids, sources)] = _run(engine, ["nobody home"], params)
    finally:
        engine.stop()
        link.close()
    assert len(ids) == params.max_tokens and set(sources) == {"fallback"}


def test_sampled_speculation_runs_the_acceptance_rule():
    """Seeded sampling: drafts carry their sparse q, the cloud accepts or resamples.
    (That the rule keeps the target distribution is tested statistically in
    tests/runtime/test_speculative.py.)"""
    model = tiny_model("qwen2")
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    with cloud_server(cloud_manager(model, SPLIT)) as port:
        engine, link = _speculative(model, port, 0.8, max_drafts=4)
        try:
            got = _run(engine, PROMPTS[:2], params)
        finally:
            engine.stop()
            link.close()
    assert all(len(ids) == params.max_tokens for ids, _ in got)
    assert all(0 <= t < model.cfg.vocab_size for ids, _ in got for t in ids)
    assert link.counters.drafts_sent > 0 and link.counters.token_failures == 0


def test_speculative_mode_refuses_exits_before_the_split():
    model = tiny_model("llama")
    decoder = ExitDecoder(model, _heads(model, (2, SPLIT)), depth=SPLIT)
    link = CloudLink(CloudLinkConfig(target="127.0.0.1:1"))
    with pytest.raises(ValueError, match="without exits before the split"):
        EdgeEngine("tiny", decoder, ByteCodec(), EngineConfig(collab="speculative"), cloud=link)


def test_a_cloud_that_forgets_the_session_gets_every_unjudged_draft_again():
    """No log: the cloud drops every session twice mid-generation (after rollbacks moved
    the edge's epoch on). The edge re-uploads its states with the drafts the cloud had not
    judged, and the output still equals the full model."""
    model = tiny_model("llama")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompt = "forget the drafts"
    expected = list(generate(ExitDecoder(model), ByteCodec().encode(prompt), params).token_ids)
    manager = cloud_manager(model, SPLIT)

    class Forgetful(EdgeEngine):
        def _step(self):
            if self._running and len(self._running[0].ids) in (6, 13):
                for sid in list(manager.store._sessions):
                    manager.release(sid)
            super()._step()

    with cloud_server(manager) as port:
        link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}", timeout_s=10.0))
        link.start()
        decoder = ExitDecoder(
            model, _heads(model, (SPLIT,)), exit_rule=CoinExits(0.7, 3), depth=SPLIT
        )
        config = EngineConfig(tau=0.5, collab="speculative", max_drafts=5)
        engine = Forgetful("tiny", decoder, ByteCodec(), config, cloud=link)
        engine.start()
        try:
            [(ids, sources)] = _run(engine, [prompt], params)
        finally:
            engine.stop()
            link.close()
    assert ids == expected
    assert link.counters.recoveries >= 1 and link.counters.rollbacks >= 1
    assert "fallback" not in sources
