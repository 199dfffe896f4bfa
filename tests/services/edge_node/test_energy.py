"""Per-request energy on the edge engine: each model step's joules (a fake meter that
counts 1 J per reading interval) are split among the step's requests; the last chunk
reports the request's total and its source; the metrics export the engine's total."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.metrics import EdgeMetrics
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.engine_api import GenerationRequest
from tandem.runtime.sampling import SamplingParams
from tests.tiny import ByteCodec, tiny_model


class StepMeter:
    """Every read advances 0.5 J: a step (two reads) costs 1 J, 0.5 J of it inside."""

    source = "measured:fake"

    def __init__(self) -> None:
        self.j = 0.0

    def read_joules(self) -> float:
        self.j += 0.5
        return self.j


def _req(rid: str, max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(rid, tuple(ByteCodec().encode("hi")), params)


async def _last(engine, req):
    last = None
    async for c in engine.generate(req):
        last = c
    return last


def test_step_energy_is_shared_and_reported():
    meter = StepMeter()
    config = EngineConfig(max_batch=4, max_context=64)
    eng = EdgeEngine("tiny", ExitDecoder(tiny_model("llama")), ByteCodec(), config, meter=meter)
    eng.start()
    try:

        async def both():
            return await asyncio.gather(_last(eng, _req("a", 4)), _last(eng, _req("b", 4)))

        a, b = asyncio.run(asyncio.wait_for(both(), 60))
    finally:
        eng.stop()
    for chunk in (a, b):
        assert chunk.finish_reason == "length"
        assert chunk.report["energy_source"] == "measured:fake"
        assert chunk.report["energy_joules"] > 0
    # every step's 0.5 J went to its requests, no more and no less
    total = a.report["energy_joules"] + b.report["energy_joules"]
    assert abs(total - eng.stats.energy_j) < 1e-6
    assert abs(eng.stats.energy_j - 0.5 * eng.stats.steps) < 1e-6

    metrics = EdgeMetrics(CollectorRegistry(), model_name="tiny")
    metrics.bind_energy(eng.stats, eng.energy_source)
    got = metrics.registry.get_sample_value(
        "tandem_edge_energy_joules_total", {"model": "tiny", "source": "measured:fake"}
    )
    assert got == eng.stats.energy_j


def test_no_meter_no_report():
    eng = EdgeEngine("tiny", ExitDecoder(tiny_model("llama")), ByteCodec(), EngineConfig())
    eng.start()
    try:
        last = asyncio.run(asyncio.wait_for(_last(eng, _req("a", 2)), 60))
    finally:
        eng.stop()
    assert last.report is None and eng.energy_source is None


def test_edge_device_flag(capsys, monkeypatch):
    import pytest
    import torch

    from services.edge_node.main import parse_settings
    from tandem.models.registry import ModelRegistry

    monkeypatch.setenv("TANDEM_DEVICE", "cpu")
    assert parse_settings(ModelRegistry(), []).device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_settings(ModelRegistry(), ["--device", "cuda:0"])
        assert "asks for a GPU" in capsys.readouterr().err


def test_energy_crosses_the_grpc_wire():
    """The last chunk's energy travels in GenerateChunk (to the router's gRPC experts)."""
    from services.edge_node.grpc_server import chunks_to_proto
    from tandem.clients.edge import chunk_from_proto
    from tandem.runtime.engine_api import GenerationChunk

    energy = {"energy_joules": 0.5, "energy_source": "measured:rapl"}
    first = GenerationChunk("a", (5,), (3,), 2, 1, None, ("edge",))
    last = GenerationChunk("b", (6,), (3,), 2, 2, "stop", ("edge",), energy)
    assert chunk_from_proto(chunks_to_proto([first, last])).report == energy
    assert chunk_from_proto(chunks_to_proto([first])).report is None
