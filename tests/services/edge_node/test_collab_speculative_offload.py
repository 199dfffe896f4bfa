"""Lossless collaboration over an attention pool: an edge engine drafts at its split head
(a random exit rule, so many drafts are wrong), a real cloud context manager in offload mode
judges them over gRPC, its attention in a real 2-worker pool over gRPC (all on 127.0.0.1;
tiny fp32 llama, fp16 on the wire). Every rollback truncates the session's KV in the pool;
the output must equal the full model's greedy decoding."""

from __future__ import annotations

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.offload import OffloadRunner
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from tandem.clients.pool import PoolClient, PoolShape
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.services.attention_pool.inproc_pool import PoolSpec, inproc_pool
from tests.services.edge_node.cloud_server import cloud_server
from tests.services.edge_node.test_collab import _run
from tests.services.edge_node.test_collab_speculative import PROMPTS, SPLIT, _speculative
from tests.tiny import ByteCodec, tiny_model

WIRE = torch.float16


def test_greedy_output_over_the_pool_equals_the_full_model_whatever_the_drafts():
    model = tiny_model("llama")
    cfg = model.cfg
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = ExitDecoder(model)
    expected = [list(generate(full, ByteCodec().encode(p), params).token_ids) for p in PROMPTS]
    spec = PoolSpec(
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attn_scale, SPLIT, cfg.n_layers - SPLIT, WIRE
    )
    with inproc_pool(spec) as pool:
        shape = PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, WIRE)
        client = PoolClient(pool.addresses, shape)
        truncations = []
        real_truncate = client.truncate

        def counted(session_id: str, n: int, **kw) -> None:
            truncations.append(n)
            real_truncate(session_id, n, **kw)

        client.truncate = counted
        runner = OffloadRunner(model, SPLIT, client, micro_batches=2)
        n = cfg.n_layers
        store = SessionStore(
            lambda: model.new_kv(first_layer=n, last_layer=n), StoreLimits(), on_drop=runner.release
        )
        manager = CloudContextManager(model, SPLIT, store, runner=runner)
        try:
            with cloud_server(manager) as port:
                engine, link = _speculative(model, port, 0.7, max_drafts=6)
                try:
                    got = _run(engine, PROMPTS, params)
                finally:
                    engine.stop()
                    link.close()
        finally:
            runner.close()
            client.close()
    assert [ids for ids, _ in got] == expected
    c = link.counters
    assert c.drafts_sent > 0 and c.rollbacks > 0  # wrong drafts: KV truncated in the pool
    assert c.token_failures == 0
    # Rollbacks truncated the pool's KV (one whose rejected draft was the last row run has
    # nothing to cut); none lost it and recomputed.
    assert len(truncations) >= 1 and manager.kv_rebuilds == 0


@pytest.mark.slow
def test_real_model_over_the_pool_equals_the_full_model():
    """qwen05 (int4 as served, split at layer 12 of 24; bf16 on the wire), its trained
    split head drafting at tau 0.3 (many drafts, some wrong): the greedy output through a
    real 2-worker pool equals the full model's, token for token."""
    from pathlib import Path

    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry
    from tandem.runtime.engine_api import ChatMessage
    from tests.services.edge_node.test_collab import _run_ids

    split = 12
    lm = load_model(
        ModelRegistry().get("qwen05"),
        LoadOptions(quant="int4", exits=True, cache_dir=Path("model_cache")),
    )
    model, cfg = lm.model, lm.model.cfg
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    questions = ["Write a Python function that reverses a string.", "Why is the sky blue?"]
    prompts = [lm.codec.encode_chat([ChatMessage("user", q)]) for q in questions]
    expected = [list(generate(lm.decoder(), p, params).token_ids) for p in prompts]
    wire = torch.bfloat16
    n = cfg.n_layers
    spec = PoolSpec(
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attn_scale, split, n - split, wire
    )
    with inproc_pool(spec) as pool:
        client = PoolClient(
            pool.addresses, PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, wire)
        )
        runner = OffloadRunner(model, split, client, micro_batches=2)
        store = SessionStore(
            lambda: model.new_kv(first_layer=n, last_layer=n), StoreLimits(), on_drop=runner.release
        )
        manager = CloudContextManager(model, split, store, runner=runner)
        try:
            with cloud_server(manager) as port:
                link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}", timeout_s=60.0))
                link.start()
                engine = EdgeEngine(
                    "qwen05",
                    lm.decoder(depth=split, split_only=True),
                    lm.codec,
                    EngineConfig(tau=0.3, collab="speculative"),
                    cloud=link,
                )
                engine.start()
                try:
                    got = _run_ids(engine, prompts, params)
                finally:
                    engine.stop()
                    link.close()
        finally:
            runner.close()
            client.close()
    assert [ids for ids, _ in got] == expected
    c = link.counters
    assert c.token_failures == 0 and c.drafts_sent > 0 and manager.kv_rebuilds == 0
    print(f"qwen05 over the pool: {c.drafts_sent} drafts, {c.rollbacks} rollbacks")
