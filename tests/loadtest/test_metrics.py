"""loadtest.metrics on hand-made timelines: vLLM's serving-benchmark definitions of TTFT, ITL,
TPOT, E2E and goodput, and the goodput SLO's edge cases. Pure: no locust, no server."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from loadtest.metrics import (
    Dist,
    RequestRecord,
    Slo,
    benchmark_duration,
    itls,
    meets_slo,
    percentile,
    record_from_timeline,
    summarize,
    tpot,
    ttft,
)

ROOT = Path(__file__).resolve().parents[2]


def ok(start: float, ttft_s: float, e2e_s: float, tokens: int, gaps=()) -> RequestRecord:
    return RequestRecord(start, True, 200, ttft_s, e2e_s, tokens, tuple(gaps))


def test_one_timeline() -> None:
    # sent at 10.0; content chunks at 10.5, 10.6, 10.8, 11.1; usage/last data chunk at 11.1
    chunks = [10.5, 10.6, 10.8, 11.1]
    assert ttft(10.0, chunks) == pytest.approx(0.5)
    assert itls(chunks) == pytest.approx([0.1, 0.2, 0.3])
    rec = record_from_timeline(10.0, chunks, end=11.1, output_tokens=4)
    assert rec.e2e_s == pytest.approx(1.1)
    # TPOT excludes the first token: (1.1 - 0.5) / (4 - 1)
    assert tpot(rec.ttft_s, rec.e2e_s, rec.output_tokens) == pytest.approx(0.2)
    assert rec.end == pytest.approx(11.1)


def test_tpot_counts_tokens_not_chunks() -> None:
    # 2 chunks carrying 5 tokens: one ITL gap, but TPOT divides by the 4 tokens after the first
    rec = record_from_timeline(0.0, [0.4, 1.2], end=1.2, output_tokens=5)
    assert rec.itl_s == pytest.approx((0.8,))
    assert tpot(rec.ttft_s, rec.e2e_s, 5) == pytest.approx(0.2)


def test_edge_cases_of_single_functions() -> None:
    assert ttft(1.0, []) is None
    assert itls([]) == [] and itls([3.0]) == []
    assert tpot(0.1, 0.1, 1) is None and tpot(0.1, 0.5, 0) is None


def test_percentile_matches_numpy_linear() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 99) == pytest.approx(4.96)  # numpy.percentile(xs, 99)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    d = Dist.of([0.001, 0.003])
    assert (d.n, d.mean, d.std, d.pct[50]) == (2, pytest.approx(2.0), pytest.approx(1.0), 2.0)
    assert Dist.of([]).n == 0 and math.isnan(Dist.of([]).mean)


def test_slo_boundaries() -> None:
    slo = Slo(ttft_ms=500, tpot_ms=125)  # binary-exact values, so "on the limit" is exact
    # exactly on both limits: meets them (<=, as vLLM's `slo >= value`)
    assert meets_slo(ok(0, 0.5, 0.5 + 3 * 0.125, 4), slo)
    assert not meets_slo(ok(0, 0.5001, 0.8751, 4), slo)  # TTFT over
    assert not meets_slo(ok(0, 0.25, 0.25 + 3 * 0.1251, 4), slo)  # TPOT over
    # one output token: TPOT undefined, counted as 0 for goodput (vLLM), so only TTFT matters
    assert meets_slo(ok(0, 0.4, 9.0, 1), slo)
    assert not meets_slo(ok(0, 0.6, 0.6, 1), slo)
    # an E2E SLO when set; None switches a check off
    assert not meets_slo(ok(0, 0.1, 2.0, 20), Slo(ttft_ms=None, tpot_ms=None, e2e_ms=1999))
    assert meets_slo(ok(0, 0.1, 2.0, 20), Slo(ttft_ms=None, tpot_ms=None, e2e_ms=2000))
    assert meets_slo(ok(0, 60.0, 600.0, 2), Slo(None, None, None))
    # a failure never meets an SLO, however fast
    assert not meets_slo(
        RequestRecord(0, False, 429, None, 0.001, 0, (), "rate_limit_exceeded"), slo
    )
    assert not meets_slo(RequestRecord(0, False, 200, 0.01, 0.02, 2, (), "truncated"), slo)


def test_summary_over_a_run() -> None:
    slo = Slo(ttft_ms=1000, tpot_ms=200)
    records = [
        ok(0.0, 0.5, 2.5, 11, [0.2] * 10),  # TPOT 0.2: good
        ok(1.0, 1.5, 3.5, 11, [0.2] * 10),  # TTFT 1.5 s: bad
        ok(2.0, 0.2, 8.2, 11, [0.8] * 10),  # TPOT 0.8: bad
        ok(3.0, 0.3, 0.3, 1),  # one token: good, no TPOT, no ITL
        RequestRecord(4.0, False, 429, None, 0.01, 0, (), "rate_limit_exceeded"),
        RequestRecord(5.0, False, 0, None, 5.0, 0, (), "timeout"),  # ends at 10.0
    ]
    s = summarize(records, slo)
    assert benchmark_duration(records) == pytest.approx(10.2)  # 0.0 .. 2.0 + 8.2
    assert s.duration_s == pytest.approx(10.2)
    assert (s.sent, s.completed, s.failed, s.good) == (6, 4, 2, 2)
    assert s.statuses == {"ok": 4, "rate_limit_exceeded": 1, "timeout": 1}
    assert s.request_throughput == pytest.approx(4 / 10.2)
    assert s.goodput == pytest.approx(2 / 10.2)
    assert s.total_output_tokens == 34
    assert s.output_throughput == pytest.approx(34 / 10.2)
    assert s.ttft.n == 4 and s.ttft.pct[50] == pytest.approx(400.0)  # 200 300 500 1500 ms
    assert s.tpot.n == 3 and s.tpot.pct[50] == pytest.approx(200.0)
    assert s.itl.n == 30 and s.itl.mean == pytest.approx((20 * 200 + 10 * 800) / 30)
    assert s.e2e.n == 4 and s.e2e.pct[99] == pytest.approx(percentile([300, 2500, 3500, 8200], 99))
    # an explicit duration (e.g. locust's run time) replaces the measured span
    assert summarize(records, slo, duration_s=20.0).goodput == pytest.approx(0.1)


def test_empty_and_all_failed_runs() -> None:
    s = summarize([])
    assert (s.sent, s.completed, s.goodput, s.request_throughput) == (0, 0, 0.0, 0.0)
    bad = [RequestRecord(0.0, False, 503, None, 0.5, 0, (), "not_ready")]
    s = summarize(bad)
    assert (s.completed, s.failed, s.goodput) == (0, 1, 0.0)
    assert math.isnan(s.ttft.pct[99])


def test_slo_description() -> None:
    assert Slo().describe() == "TTFT <= 2000 ms and TPOT <= 200 ms"
    assert Slo(None, None, 5000).describe() == "E2E <= 5000 ms"
    assert "every success" in Slo(None, None, None).describe()


def test_metrics_and_report_do_not_import_locust() -> None:
    """locust lives in .venv-locust only: the project's code must never import it."""
    for path in (ROOT / "loadtest").glob("*.py"):
        if path.name == "locustfile.py":
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n.split(".")[0] in {"locust", "gevent"} for n in names), path
