"""Latency telemetry and the predictor: the EWMA correction, when it asks for a re-solve, and
that energy stays modelled (uncorrected)."""

from __future__ import annotations

import pytest

from services.router.predictor import Predictor, Shape
from services.router.profiles import JETSON_AGX_ORIN, ExpertSpec
from services.router.telemetry import LatencyTelemetry


def test_ewma_correction_and_version_moves_only_on_real_drift() -> None:
    t = LatencyTelemetry(alpha=0.5, resolve_ratio=1.25)
    assert t.correction("a") == 1.0 and t.version == 0
    t.observe("a", modelled_s=1.0, measured_s=1.1)  # first sample is taken as is
    assert t.correction("a") == pytest.approx(1.1) and t.version == 0  # within 25%
    t.observe("a", modelled_s=1.0, measured_s=3.0)
    assert t.correction("a") == pytest.approx(2.05) and t.version == 1
    t.observe("a", modelled_s=2.0, measured_s=4.2)  # ratio 2.1: close to the last solve
    assert t.version == 1
    t.observe("b", modelled_s=0.0, measured_s=1.0)  # nothing modelled: ignored
    assert [s.expert_id for s in t.snapshot()] == ["a"]
    t.observe("c", modelled_s=1.0, measured_s=1e9)  # clamped
    assert t.correction("c") == 50.0


def test_predictor_corrects_latency_but_not_energy() -> None:
    p = Predictor({"a": ExpertSpec("a", JETSON_AGX_ORIN, 0.02, 0.002)}, LatencyTelemetry())
    shape = Shape(100, 50)
    modelled, energy = p.modelled_s("a", shape), p.energy_j("a", shape)
    # Jetson: (100 * 2 ms + 50 * 20 ms) * 0.5 = 0.6 s compute; link: 400 B up at 50 Mbit/s,
    # 200 B down at 100 Mbit/s, 10 ms RTT = 10.08 ms. Energy: 30 W compute + 2 W link.
    tx = 400 * 8 / 50e6 + 200 * 8 / 100e6 + 0.010
    assert modelled == pytest.approx(0.6 + tx)
    assert energy == pytest.approx(30 * 0.6 + 2 * tx)
    p.observe("a", shape, measured_s=modelled * 3)
    assert p.predicted_s("a", shape) == pytest.approx(3 * modelled)
    assert p.energy_j("a", shape) == energy


def test_shapes_round_up_to_classes() -> None:
    assert Shape(100, 50).rounded_up() == Shape(128, 64)
    assert Shape(0, 1).rounded_up() == Shape(1, 1)
    assert Shape.estimate(prompt_units=41, max_tokens=8) == Shape(11, 8)
