"""Latency-aware threshold: unchanged within budget, lowered in proportion beyond it,
never below tau_min, and tau = 1.0 (exact mode) is never lowered."""

from __future__ import annotations

import pytest

from services.edge_node.tau_policy import TauPolicy


def test_within_budget_or_unknown_keeps_tau():
    p = TauPolicy(0.9, 0.5, budget_ms=100)
    assert p.effective(None) == 0.9
    assert p.effective(80) == 0.9


def test_slow_cloud_lowers_tau_towards_tau_min():
    p = TauPolicy(0.9, 0.5, budget_ms=100)
    assert p.effective(200) == pytest.approx(0.7)
    assert p.effective(400) == pytest.approx(0.6)
    assert p.effective(1e9) == pytest.approx(0.5, abs=1e-6)
    assert p.effective(150) > p.effective(300)


def test_exact_mode_is_never_lowered():
    assert TauPolicy(1.0, 0.5, budget_ms=10).effective(1e6) == 1.0


@pytest.mark.parametrize("kw", [{"tau": 0.4, "tau_min": 0.5}, {"tau": 1.1}, {"budget_ms": 0}])
def test_invalid_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        TauPolicy(**kw)
