"""Split inference (edge layers [0, split), cloud layers [split, L)) on tiny models:
every token from the cloud equals the full model's greedy output."""

from __future__ import annotations

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager, PositionMismatch
from services.cloud_ctx.session_store import SessionStore, StoreLimits, UnknownSession
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import decode_hidden, encode_hidden
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _cloud(model: DecoderModel, **limits) -> CloudContextManager:
    store = SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits(**limits))
    return CloudContextManager(model, SPLIT, store)


def _prompt() -> list[int]:
    return torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(3)).tolist()


def _collaborate(model, cloud, carry_in_request: bool = True, wire=None) -> list[int]:
    """Every token from the cloud (tau = 1.0). The newest position's hidden state either
    rides in the request or was uploaded just before it."""
    edge, sampler, prompt = EdgeHalf(model, SPLIT), GREEDY, _prompt()
    h = edge.hidden(prompt)
    cloud.upload("s", 0, h[:-1])
    out = [cloud.next_token("s", len(prompt) - 1, sampler, h[-1:]).token]
    while len(out) < GREEDY.max_tokens:
        pos = edge.length
        hi = edge.hidden([out[-1]])
        if wire is not None:
            hi = decode_hidden(encode_hidden(hi, wire), hi.dtype)
        if carry_in_request:
            out.append(cloud.next_token("s", pos, sampler, hi).token)
        else:
            cloud.upload("s", pos, hi)
            out.append(cloud.next_token("s", pos, sampler).token)
    return out


def test_cloud_tokens_equal_full_model_greedy(arch):
    model = tiny_model(arch)
    expected = list(generate(ExitDecoder(model), _prompt(), GREEDY).token_ids)
    assert _collaborate(model, _cloud(model)) == expected
    assert _collaborate(model, _cloud(model), carry_in_request=False) == expected


def test_catch_up_runs_pending_rows_in_one_batch():
    model = tiny_model("llama")
    cloud = _cloud(model)
    edge = EdgeHalf(model, SPLIT)
    h = edge.hidden(_prompt())
    cloud.upload("s", 0, h[:2])
    cloud.upload("s", 2, h[2:5])
    result = cloud.next_token("s", 5, GREEDY, h[5:])
    assert result.catch_up_rows == 6
    assert cloud.store.get("s").pending_rows() == 0


def test_int8_transport_runs_and_mostly_agrees():
    model = tiny_model("qwen2")
    expected = list(generate(ExitDecoder(model), _prompt(), GREEDY).token_ids)
    got = _collaborate(model, _cloud(model), wire="int8")
    assert len(got) == len(expected)
    assert got[0] == expected[0]  # the prompt went fp32; first token identical


def test_position_errors_and_recovery_after_eviction():
    model = tiny_model("llama")
    cloud = _cloud(model)
    edge = EdgeHalf(model, SPLIT)
    h = edge.hidden(_prompt())
    cloud.upload("s", 0, h[:3])
    with pytest.raises(PositionMismatch) as gap:
        cloud.upload("s", 4, h[4:])
    assert gap.value.expected == 3
    with pytest.raises(PositionMismatch):
        cloud.next_token("s", 1, GREEDY)
    cloud.release("s")
    with pytest.raises(UnknownSession):
        cloud.next_token("s", 5, GREEDY)
    cloud.upload("s", 0, h[:-1])  # the edge re-uploads its context
    again = cloud.next_token("s", 5, GREEDY, h[-1:]).token
    expected = generate(ExitDecoder(model), _prompt(), GREEDY).token_ids[0]
    assert again == expected


def test_memory_cap_evicts_least_recently_used_sessions():
    model = tiny_model("llama")
    probe = _cloud(model)
    probe.upload("a", 0, EdgeHalf(model, SPLIT).hidden(_prompt()))
    one = probe.store.nbytes()
    cloud = _cloud(model, max_bytes=int(one * 2.5))
    for sid in ("a", "b", "c"):
        cloud.upload(sid, 0, EdgeHalf(model, SPLIT).hidden(_prompt()))
    assert len(cloud.store) == 2 and cloud.store.evictions["lru"] == 1
    with pytest.raises(UnknownSession):
        cloud.store.get("a")


def test_requests_of_several_sessions_share_one_forward_and_equal_separate_runs(arch):
    """next_tokens answers several sessions (different lengths, one with pending rows
    from an upload) in one batched forward; every session's tokens equal the full model's
    greedy output, and a bad request in the batch fails alone."""
    from services.cloud_ctx.context_manager import TokenAsk

    model = tiny_model(arch)
    cloud = _cloud(model)
    prompts = [_prompt(), _prompt()[:3], [7, 8, 9, 10, 11, 12, 13, 14]]
    expected = [list(generate(ExitDecoder(model), p, GREEDY).token_ids) for p in prompts]
    edges = [EdgeHalf(model, SPLIT) for _ in prompts]
    hidden = [e.hidden(p) for e, p in zip(edges, prompts, strict=True)]
    cloud.upload("s2", 0, hidden[2][:-2])  # pending rows join the batch
    asks = [
        TokenAsk(f"s{i}", len(p) - 1, GREEDY, h)
        for i, (p, h) in enumerate(zip(prompts, hidden, strict=True))
    ]
    asks[2] = TokenAsk("s2", len(prompts[2]) - 1, GREEDY, hidden[2][-2:])
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(GREEDY.max_tokens):
        bad = TokenAsk("nobody", 5, GREEDY)
        answers = cloud.next_tokens([*asks, bad])
        assert isinstance(answers[-1], UnknownSession)
        for i, answer in enumerate(answers[:-1]):
            outs[i].append(answer.token)
        asks = [
            TokenAsk(f"s{i}", edges[i].length, GREEDY, edges[i].hidden([outs[i][-1]]))
            for i in range(len(prompts))
        ]
    assert outs == expected
