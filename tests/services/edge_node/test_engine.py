"""EdgeEngine on a tiny random model: batching, streaming, abort, limits."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import pytest

from services.edge_node.engine import EdgeEngine, EngineConfig
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.engine_api import EngineOverloaded, GenerationRequest, PromptTooLong
from tandem.runtime.sampling import SamplingParams
from tests.tiny import ByteCodec, tiny_model


@contextmanager
def running_engine(config: EngineConfig, decoder: ExitDecoder | None = None):
    eng = EdgeEngine("tiny", decoder or ExitDecoder(tiny_model("llama")), ByteCodec(), config)
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture
def engine():
    with running_engine(EngineConfig(max_batch=4, max_waiting=6, max_context=128)) as eng:
        yield eng


def _req(rid: str, prompt: str = "hello", **kw) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **kw})
    return GenerationRequest(rid, tuple(ByteCodec().encode(prompt)), params)


async def _collect(engine, req):
    chunks = []
    async for c in engine.generate(req):
        chunks.append(c)
    return chunks


def test_generates_until_max_tokens(engine):
    chunks = asyncio.run(asyncio.wait_for(_collect(engine, _req("a")), 30))
    assert [c.completion_tokens for c in chunks] == list(range(1, 9))
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_concurrent_requests_are_batched_and_match_serial(engine):
    async def main():
        serial = [await _collect(engine, _req(f"s{i}", f"prompt {i}")) for i in range(4)]
        seen_batch = 0

        async def watch():
            nonlocal seen_batch
            while True:
                seen_batch = max(seen_batch, engine.running())
                await asyncio.sleep(0.001)

        w = asyncio.create_task(watch())
        together = await asyncio.gather(
            *[_collect(engine, _req(f"c{i}", f"prompt {i}")) for i in range(4)]
        )
        w.cancel()
        return serial, together, seen_batch

    serial, together, seen_batch = asyncio.run(asyncio.wait_for(main(), 60))
    ids = lambda chunks: [t for c in chunks for t in c.token_ids]  # noqa: E731
    assert [ids(c) for c in together] == [ids(c) for c in serial]  # greedy: same tokens
    assert seen_batch >= 2


def test_abort_frees_the_sequence(engine):
    async def main():
        it = engine.generate(_req("x", max_tokens=100))
        await it.__anext__()
        assert engine.running() == 1
        await it.aclose()
        for _ in range(200):
            if engine.running() == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(asyncio.wait_for(main(), 30))


def test_limits(engine):
    async def main():
        with pytest.raises(PromptTooLong):
            await _collect(engine, _req("long", "x" * 200, max_tokens=8))
        with pytest.raises(ValueError):
            await _collect(engine, GenerationRequest("e", (), SamplingParams()))

    asyncio.run(main())


def test_overload_is_refused_not_queued_forever():
    async def main(eng):
        its = [eng.generate(_req(f"r{i}", max_tokens=60)) for i in range(8)]
        firsts = await asyncio.gather(*[it.__anext__() for it in its], return_exceptions=True)
        refused = [f for f in firsts if isinstance(f, EngineOverloaded)]
        for it in its:
            await it.aclose()
        return len(refused)

    with running_engine(EngineConfig(max_batch=1, max_waiting=2, max_context=128)) as eng:
        assert asyncio.run(asyncio.wait_for(main(eng), 60)) >= 1


def test_stop_string_and_seeded_sampling(engine):
    async def main():
        a = await _collect(engine, _req("s1", temperature=1.0, seed=5, max_tokens=12))
        b = await _collect(engine, _req("s2", temperature=1.0, seed=5, max_tokens=12))
        return a, b

    a, b = asyncio.run(asyncio.wait_for(main(), 30))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    text = "".join(c.text for c in a)
    if len(text) > 3:
        stop = text[2:4]
        out = asyncio.run(
            _collect(engine, _req("s3", temperature=1.0, seed=5, max_tokens=12, stop=(stop,)))
        )
        got = "".join(c.text for c in out)
        assert out[-1].finish_reason == "stop"
        assert got == text[: text.find(stop)]


def test_engine_stop_is_prompt(engine):
    t = time.monotonic()
    engine.stop()
    assert time.monotonic() - t < 5


class RecordingDecoder(ExitDecoder):
    """Records prefill chunk sizes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[list[int]] = []

    def prefill(self, seqs, prompts, tau=1.0):
        self.chunks.append([len(p) for p in prompts])
        return super().prefill(seqs, prompts, tau)


def test_long_prompts_are_prefilled_in_chunks_with_the_same_output():
    prompt = "a long prompt " * 8  # 113 tokens with the byte codec

    def run(budget: int) -> tuple[list[int], list[list[int]]]:
        dec = RecordingDecoder(tiny_model("llama"))
        config = EngineConfig(max_context=256, max_prefill_tokens=budget)
        with running_engine(config, dec) as eng:
            chunks = asyncio.run(asyncio.wait_for(_collect(eng, _req("p", prompt)), 30))
        return [t for c in chunks for t in c.token_ids], dec.chunks

    whole, whole_chunks = run(4096)
    chunked, chunk_sizes = run(16)
    assert whole_chunks == [[113]]
    assert chunk_sizes == [[16]] * 7 + [[1]]
    assert chunked == whole


def test_stop_fails_in_flight_requests_instead_of_hanging():
    eng = EdgeEngine("tiny", ExitDecoder(tiny_model("llama")), ByteCodec(), EngineConfig())

    async def main():
        eng.start()
        it = eng.generate(_req("z", max_tokens=240))
        await it.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, eng.stop)
        with pytest.raises(RuntimeError, match="shutting down"):
            async for _ in it:
                pass

    asyncio.run(asyncio.wait_for(main(), 30))


def test_text_deltas_equal_the_full_decode_and_hold_incomplete_characters(engine):
    """Sampled bytes from a random model: multi-byte and invalid UTF-8. The streamed deltas
    add up to a full decode of the tokens, and no chunk but the last ends in U+FFFD (an
    incomplete character is held back until it completes)."""

    async def main():
        return [
            await _collect(engine, _req(f"u{seed}", temperature=1.5, seed=seed, max_tokens=40))
            for seed in range(6)
        ]

    codec = ByteCodec()
    for chunks in asyncio.run(asyncio.wait_for(main(), 60)):
        ids = [t for c in chunks for t in c.token_ids]
        assert "".join(c.text for c in chunks) == codec.decode(ids)
        assert not any(c.text.endswith("\ufffd") for c in chunks[:-1])
