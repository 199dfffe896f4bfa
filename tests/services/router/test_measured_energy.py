"""Measured energy in the router: an expert's usage report with measured joules is used
as the figure and feeds the energy telemetry (later predictions are corrected, cached
selections re-solved); the report says measured / modelled / mixed per figure and per
expert; an OpenAI-compatible Tandem upstream's usage.tandem energy is read."""

from __future__ import annotations

import pytest

from services.router.openai_engine import _StreamParser
from services.router.predictor import Predictor, Shape, measured_joules
from services.router.report import RouteReport
from services.router.telemetry import LatencyTelemetry


def _predictor() -> Predictor:
    from services.router.profiles import DeviceProfile, ExpertSpec

    dev = DeviceProfile("dev", 10.0, 1.0, 1.0, 1e8, 1e8, 0.01)
    spec = ExpertSpec("e", dev, decode_s_per_token=0.01, prefill_s_per_token=0.001)
    return Predictor({"e": spec}, LatencyTelemetry(alpha=1.0))


def test_measured_joules_accepts_only_measured_numbers():
    assert measured_joules({"energy_joules": 2.5, "energy_source": "measured:nvml"}) == 2.5
    assert measured_joules({"energy_joules": 2.5, "energy_source": "modelled"}) is None
    assert measured_joules({"energy_joules": -1, "energy_source": "measured:rapl"}) is None
    assert measured_joules({"energy_joules": True, "energy_source": "measured:rapl"}) is None
    assert measured_joules({"energy_source": "measured:rapl"}) is None
    assert measured_joules(None) is None


def test_energy_of_prefers_measured_and_corrects_predictions():
    p = _predictor()
    shape = Shape(10, 20)
    modelled = p.energy_j("e", shape)
    j, src = p.energy_of("e", shape, None)
    assert (j, src) == (modelled, "modelled")
    version = p.telemetry.version
    j, src = p.energy_of(
        "e", shape, {"energy_joules": 3 * modelled, "energy_source": "measured:rapl"}
    )
    assert (j, src) == (pytest.approx(3 * modelled), "measured:rapl")
    assert p.energy_j("e", shape) == pytest.approx(3 * modelled)  # the telemetry learned it
    assert p.telemetry.version > version  # cached selections are re-solved


def test_report_says_what_each_figure_is():
    r = RouteReport(selection="auto", budget={})
    assert r.energy_source == "modelled"
    r.set_energy({"a": (1.0, "measured:nvml"), "b": (2.0, "measured:jetson")})
    assert r.energy_j == 3.0 and r.energy_source == "measured"
    assert r.usage()["router"]["energy_sources"] == {"a": "measured:nvml", "b": "measured:jetson"}
    r.set_energy({"a": (1.0, "measured:nvml"), "b": (2.0, "modelled")})
    assert r.energy_source == "mixed"
    assert r.headers(final=True)["x-tandem-energy-source"] == "mixed"
    r.set_energy({"b": (2.0, "modelled")})
    assert r.energy_source == "modelled"


def test_openai_upstream_energy_is_read_from_usage():
    parser = _StreamParser(chat=True, prompt_tokens=3)
    body = {
        "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "tandem": {"energy_joules": 0.75, "energy_source": "measured:rapl"},
        },
    }
    last = parser.whole(body)[-1]
    assert last.report == {"energy_joules": 0.75, "energy_source": "measured:rapl"}
    plain = _StreamParser(chat=True, prompt_tokens=3).whole({**body, "usage": {}})[-1]
    assert plain.report is None
