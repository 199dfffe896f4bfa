"""Lossless collaboration on a real model (qwen05, int4 as served, split at its middle exit,
layer 12 of 24): with the trained split head drafting at any tau, the greedy output equals
the full model's, token for token (slow: loads a real model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.engine_api import ChatMessage
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.services.edge_node.cloud_server import cloud_manager, cloud_server
from tests.services.edge_node.test_collab import _run_ids

pytestmark = pytest.mark.slow
SPLIT = 12
QUESTIONS = ["Write a Python function that reverses a string.", "Why is the sky blue?"]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen05():
    return load_model(
        ModelRegistry().get("qwen05"),
        LoadOptions(quant="int4", exits=True, cache_dir=Path("model_cache")),
    )


@pytest.mark.parametrize("tau", [0.3, 0.9])
def test_speculative_greedy_equals_the_full_model(qwen05, tau):
    prompts = [qwen05.codec.encode_chat([ChatMessage("user", q)]) for q in QUESTIONS]
    expected = [list(generate(qwen05.decoder(), p, PARAMS).token_ids) for p in prompts]
    with cloud_server(cloud_manager(qwen05.model, SPLIT)) as port:
        link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}", timeout_s=30.0))
        link.start()
        engine = EdgeEngine(
            "qwen05",
            qwen05.decoder(depth=SPLIT, split_only=True),
            qwen05.codec,
            EngineConfig(tau=tau, collab="speculative"),
            cloud=link,
        )
        engine.start()
        try:
            got = _run_ids(engine, prompts, PARAMS)
        finally:
            engine.stop()
            link.close()
    assert [ids for ids, _ in got] == expected
    assert link.counters.token_failures == 0
    drafted = sum(s == "edge" for _, src in got for s in src)
    if tau == 0.3:
        assert link.counters.drafts_sent > 0 and drafted > 0
