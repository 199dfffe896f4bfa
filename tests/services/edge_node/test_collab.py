"""Collaborative mode (CE-CoLLM) on a tiny random model: an edge engine running layers
[0, split) talks to a real cloud context manager over gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import torch

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.tau_policy import TauPolicy
from tandem.launch import free_port
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.engine_api import GenerationRequest
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.runtime.test_decoder import ScriptedExits, _heads
from tests.services.edge_node.cloud_server import cloud_manager, cloud_server
from tests.tiny import ByteCodec, tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["the cloud", "edge and cloud together", "x"]


@contextmanager
def collab_engine(model, target: str, tau: float = 1.0, decoder=None, **link):
    cloud = CloudLink(CloudLinkConfig(target=target, **link))
    cloud.start()
    engine = EdgeEngine(
        "tiny",
        decoder or ExitDecoder(model, depth=SPLIT),
        ByteCodec(),
        EngineConfig(max_batch=4, max_context=128, tau=tau),
        cloud=cloud,
        tau_policy=TauPolicy(tau, min(tau, 0.5)),
    )
    engine.start()
    try:
        yield engine, cloud
    finally:
        engine.stop()
        cloud.close()


def _run(engine, prompts: list[str], params: SamplingParams = GREEDY):
    return _run_ids(engine, [ByteCodec().encode(p) for p in prompts], params)


def _run_ids(engine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    """Generate for every prompt at once; (token ids, sources) of each."""

    async def one(i, prompt):
        req = GenerationRequest(f"r{i}", tuple(prompt), params)
        ids, sources = [], []
        async for c in engine.generate(req):
            ids.extend(c.token_ids)
            sources.extend(c.sources)
        return ids, sources

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_tau_one_sends_every_token_to_the_cloud_and_equals_full_model():
    model = tiny_model("llama")
    full = ExitDecoder(model)
    expected = [list(generate(full, ByteCodec().encode(p), GREEDY).token_ids) for p in PROMPTS]
    manager = cloud_manager(model, SPLIT)
    with cloud_server(manager) as port, collab_engine(model, f"127.0.0.1:{port}") as (eng, link):
        got = _run(eng, PROMPTS)
        # every request's session is released when it finishes
        for _ in range(100):
            if len(manager.store) == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
    assert [ids for ids, _ in got] == expected
    assert all(s == ["cloud"] * GREEDY.max_tokens for _, s in got)
    assert len(manager.store) == 0
    c = link.counters
    assert c.token_requests == len(PROMPTS) * GREEDY.max_tokens and c.token_failures == 0
    n_positions = sum(len(ByteCodec().encode(p)) + GREEDY.max_tokens - 1 for p in PROMPTS)
    assert c.positions_sent <= n_positions + 4  # one row per request, rare resends


def test_cloud_tokens_are_exact_when_the_edge_exits_early():
    """Tokens exit at an early edge head, at the split head or go to the cloud (scripted).
    Every cloud token must be the full model's greedy choice after that prefix, which
    needs every position, exited or not, uploaded exactly."""
    model = tiny_model("qwen2")
    script = [None, 2, 3, None, 2, 2, None, 3, 2, None, None, 2]
    rule = ScriptedExits(script, (2, 3))
    decoder = ExitDecoder(
        model, _heads(model, (2, 3)), max_deferred=100, exit_rule=rule, depth=SPLIT
    )

    class StepCounter(EdgeEngine):
        def _finish_steps(self, batch, steps, sample):
            super()._finish_steps(batch, steps, sample)
            if any(sample):
                rule.next_step()

    manager = cloud_manager(model, SPLIT)
    with cloud_server(manager) as port:
        link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}"))
        link.start()
        eng = StepCounter(
            "tiny", decoder, ByteCodec(), EngineConfig(max_batch=1, tau=0.5), cloud=link
        )
        eng.start()
        try:
            [(ids, sources)] = _run(eng, ["split me"])
        finally:
            eng.stop()
            link.close()
    assert sources == ["cloud" if x is None else "edge" for x in script]
    prompt = ByteCodec().encode("split me")
    logits = [
        model.forward_tokens([prompt + ids[:i]], [model.new_kv()], [0])[0] for i in range(len(ids))
    ]
    for i, src in enumerate(sources):
        if src == "cloud":
            assert ids[i] == int(torch.argmax(logits[i])), f"token {i}"


def test_unreachable_cloud_falls_back_to_the_edge_and_says_so():
    model = tiny_model("llama")
    dead = f"127.0.0.1:{free_port()}"
    with collab_engine(model, dead, tau=0.9, timeout_s=1.0, backoff_s=30.0) as (eng, link):
        [(ids, sources)] = _run(eng, ["no cloud today"])
    assert len(ids) == GREEDY.max_tokens
    assert set(sources) == {"fallback"}
    assert not link.available()  # circuit open: later tokens did not wait for the cloud
    assert link.counters.token_requests == link.counters.token_failures == 1


def test_lost_cloud_session_is_rebuilt_from_the_edge_copy():
    """The cloud forgets every session mid-generation (restart without a log): the edge
    resends the context it keeps, and the output still equals the full model."""
    model = tiny_model("gemma3")
    expected = list(generate(ExitDecoder(model), ByteCodec().encode("forget me"), GREEDY).token_ids)
    manager = cloud_manager(model, SPLIT)

    class Forgetful(EdgeEngine):
        def _step(self):
            if self._running and len(self._running[0].ids) == 5:
                for sid in list(manager.store._sessions):
                    manager.release(sid)
            super()._step()

    with cloud_server(manager) as port:
        link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}"))
        link.start()
        eng = Forgetful("tiny", ExitDecoder(model, depth=SPLIT), ByteCodec(), EngineConfig(), link)
        eng.start()
        try:
            [(ids, sources)] = _run(eng, ["forget me"])
        finally:
            eng.stop()
            link.close()
    assert ids == expected and set(sources) == {"cloud"}
    assert link.counters.recoveries >= 1


def test_int8_transport_keeps_the_first_tokens():
    model = tiny_model("qwen2")
    expected = list(generate(ExitDecoder(model), ByteCodec().encode("int8"), GREEDY).token_ids)
    with (
        cloud_server(cloud_manager(model, SPLIT)) as port,
        collab_engine(model, f"127.0.0.1:{port}", encoding="int8") as (eng, link),
    ):
        [(ids, _)] = _run(eng, ["int8"])
    assert len(ids) == len(expected) and ids[0] == expected[0]
    assert link.counters.bytes_up > 0


def test_cloud_with_a_token_answers_only_edges_that_present_it():
    model = tiny_model("llama")
    expected = list(generate(ExitDecoder(model), ByteCodec().encode("secret"), GREEDY).token_ids)
    with cloud_server(cloud_manager(model, SPLIT), token="s3cret") as port:
        target = f"127.0.0.1:{port}"
        with collab_engine(model, target, token="s3cret") as (eng, link):
            [(ids, sources)] = _run(eng, ["secret"])
        assert ids == expected and set(sources) == {"cloud"}
        with collab_engine(model, target, tau=0.9, token="wrong") as (eng, link):
            [(ids, sources)] = _run(eng, ["secret"])
        assert set(sources) == {"fallback"} and link.counters.token_failures > 0


def test_a_cloud_slower_than_the_budget_lowers_tau():
    """Latency-aware tau in the engine: once the link has measured the cloud, a budget far
    below its round trip pulls the threshold down to tau_min; within budget it stays."""
    model = tiny_model("llama")
    with cloud_server(cloud_manager(model, SPLIT)) as port:
        for budget_ms, low in ((1e-3, True), (1e6, False)):
            link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}"))
            link.start()
            eng = EdgeEngine(
                "tiny",
                ExitDecoder(model, depth=SPLIT),
                ByteCodec(),
                EngineConfig(tau=0.9),
                cloud=link,
                tau_policy=TauPolicy(0.9, 0.5, budget_ms=budget_ms),
            )
            eng.start()
            try:
                _run(eng, ["how fast is the cloud"])
            finally:
                eng.stop()
                link.close()
            assert link.expected_ms() is not None and link.expected_ms() > 0
            assert (eng.tau_now < 0.51) if low else (eng.tau_now == 0.9)


def test_a_steps_token_requests_share_messages_and_equal_the_full_model():
    model = tiny_model("llama")
    full = ExitDecoder(model)
    expected = [list(generate(full, ByteCodec().encode(p), GREEDY).token_ids) for p in PROMPTS]
    counters = {}
    for batch in (True, False):
        manager = cloud_manager(model, SPLIT)
        with (
            cloud_server(manager) as port,
            collab_engine(model, f"127.0.0.1:{port}", batch_asks=batch) as (eng, link),
        ):
            got = _run(eng, PROMPTS)
        assert [ids for ids, _ in got] == expected
        counters[batch] = link.counters
    shared, alone = counters[True], counters[False]
    assert alone.token_messages == alone.token_requests
    # three requests per step while all three prompts run: fewer messages than requests
    assert shared.token_requests == alone.token_requests
    assert shared.token_messages < shared.token_requests
    assert shared.token_failures == 0


def test_a_session_lost_inside_a_shared_message_is_rebuilt_the_others_answered():
    """The cloud forgets one session mid-generation: its request in the step's shared
    message fails with NOT_FOUND alone, the edge resends its context, and every output
    still equals the full model."""
    model = tiny_model("llama")
    full = ExitDecoder(model)
    expected = [list(generate(full, ByteCodec().encode(p), GREEDY).token_ids) for p in PROMPTS]
    manager = cloud_manager(model, SPLIT)
    forgotten = []

    class Forgetful(EdgeEngine):
        def _step(self):
            if not forgotten and self._running and len(self._running[0].ids) == 5:
                sid = sorted(manager.store._sessions)[0]
                manager.release(sid)
                forgotten.append(sid)
            super()._step()

    with cloud_server(manager) as port:
        link = CloudLink(CloudLinkConfig(target=f"127.0.0.1:{port}"))
        link.start()
        eng = Forgetful(
            "tiny", ExitDecoder(model, depth=SPLIT), ByteCodec(), EngineConfig(max_batch=4), link
        )
        eng.start()
        try:
            got = _run(eng, PROMPTS)
        finally:
            eng.stop()
            link.close()
    assert [ids for ids, _ in got] == expected
    assert all(set(s) == {"cloud"} for _, s in got)
    assert forgotten and link.counters.recoveries >= 1
    assert link.counters.token_messages < link.counters.token_requests
