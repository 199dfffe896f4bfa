"""The smallest real model split at half depth (smollm2, 15 of 30 layers): with every
token computed by the cloud (tau = 1.0) and fp16 transport, greedy output is identical to
the full model's (slow: loads a real model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import decode_hidden, encode_hidden
from tests.services.cloud_ctx.edge_half import EdgeHalf

pytestmark = pytest.mark.slow


@torch.inference_mode()
def test_split_smollm2_greedy_equals_full_model():
    lm = load_model(
        ModelRegistry().get("smollm2"),
        LoadOptions(quant="bf16", exits=False, cache_dir=Path("model_cache")),
    )
    model, split = lm.model, 15
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = lm.codec.encode("def fibonacci(n):")
    expected = list(generate(lm.decoder(), prompt, params).token_ids)

    cloud = CloudContextManager(
        model, split, SessionStore(lambda: model.new_kv(first_layer=split), StoreLimits())
    )
    edge, out, ids = EdgeHalf(model, split), [], prompt
    while len(out) < params.max_tokens:
        start = edge.length
        h = decode_hidden(encode_hidden(edge.hidden(ids), "fp16"), model.dtype)
        if len(ids) > 1:
            cloud.upload("s", start, h[:-1])
        out.append(cloud.next_token("s", edge.length - 1, params, h[-1:]).token)
        ids = [out[-1]]
    assert out == expected
