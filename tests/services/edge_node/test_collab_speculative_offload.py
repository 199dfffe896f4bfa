"""Lossless collaboration over an attention pool: an edge engine drafts at its split head
(a random exit rule, so many drafts are wrong), a real cloud context manager in offload mode
judges them over gRPC, its attention in a real 2-worker pool over gRPC (all on 127.0.0.1;
tiny fp32 llama, fp16 on the wire). Every rollback truncates the session's KV in the pool;
the output must equal the full model's greedy decoding."""

from __future__ import annotations

import torch

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.offload import OffloadRunner
from services.cloud_ctx.session_store import SessionStore, StoreLimits
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
