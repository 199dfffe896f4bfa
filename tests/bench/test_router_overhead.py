import pytest

from bench.router_overhead import Row, Summary, percentile


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_row_overheads():
    row = Row.of("m", [10.0, 20.0, 30.0], [12.0, 21.0, 36.0])
    assert row.direct == Summary(3, 20.0, pytest.approx(29.8), 20.0)
    assert row.overhead_p50_ms == 1.0
    assert row.ratio_p50 == pytest.approx(21 / 20)
    assert row.paired_median_ms == 2.0
    assert row.as_dict()["overhead_p99_ms"] == pytest.approx(row.routed.p99 - row.direct.p99)
    with pytest.raises(ValueError):
        Row.of("m", [1.0], [1.0, 2.0])
