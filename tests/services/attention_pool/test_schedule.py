"""Rotational staggered pipelining, simulated (papers.md 3.2 item 4)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from services.attention_pool.schedule import (
    Op,
    ScheduleResult,
    ping_pong,
    report_table,
    sequential,
    simulate,
    sized_attn_slice,
    sweep,
)


def _overlaps(result: ScheduleResult) -> int:
    """Independent check: pairs of operations that overlap on one resource."""
    by_resource: dict[str, list[Op]] = defaultdict(list)
    for op in result.ops:
        by_resource[op.resource].append(op)
    bad = 0
    for ops in by_resource.values():
        ops.sort(key=lambda o: o.start)
        bad += sum(1 for a, b in zip(ops, ops[1:], strict=False) if b.start < a.end - 1e-12)
    return bad


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_sized_pool_is_bubble_and_conflict_free(n):
    t_m = 1.0
    t_a = sized_attn_slice(n, t_m)
    r = simulate(n, t_m, t_a, layers=4, steps=10)
    assert r.conflicts == 0 and r.conflict_free
    assert _overlaps(r) == 0
    assert r.bubble_time == pytest.approx(0.0, abs=1e-9)
    assert r.steady_replica_utilisation == pytest.approx(1.0)
    assert r.steady_pool_utilisation == pytest.approx(1.0)
    # the rule's assignment: slice k of batch j on replica ((j + k) mod (n - 1)) + 1
    for op in r.ops:
        if op.kind == "model":
            k = op.step * 4 + op.layer
            assert op.resource == f"replica{(op.batch + k) % (n - 1) + 1}"
    # replica j starts t_m / (n - 1) after replica j - 1
    firsts = sorted(min(o.start for o in r.ops if o.resource == f"replica{i + 1}")
                    for i in range(n - 1))  # fmt: skip
    assert firsts == pytest.approx([i * t_m / (n - 1) for i in range(n - 1)])
    # utilisation over the whole run tends to 1 as steps grow (only fill and drain idle)
    utils = [simulate(n, t_m, t_a, 4, s).replica_utilisation for s in (1, 5, 40)]
    assert utils == sorted(utils) and utils[-1] > 0.99


@pytest.mark.parametrize("n", [3, 4, 6])
def test_slow_pool_leaves_replica_bubbles(n):
    t_m = 1.0
    r = simulate(n, t_m, 1.5 * sized_attn_slice(n, t_m), layers=4, steps=10)
    assert r.bubble_fraction > 0.2
    assert r.steady_pool_utilisation == pytest.approx(1.0)
    assert r.conflicts > 0  # attentions queue at the pool
    assert _overlaps(r) == 0  # ... but the simulation never double-books it


@pytest.mark.parametrize("n", [3, 4, 6])
def test_fast_pool_idles(n):
    t_m = 1.0
    r = simulate(n, t_m, 0.5 * sized_attn_slice(n, t_m), layers=4, steps=10)
    assert r.bubble_time == pytest.approx(0.0, abs=1e-9)
    assert r.steady_replica_utilisation == pytest.approx(1.0)
    assert r.steady_pool_utilisation == pytest.approx(0.5, abs=0.02)
    assert r.conflicts > 0  # slices queue at their replica


def test_ping_pong_doubles_sequential_throughput():
    layers, steps = 4, 25
    pp = ping_pong(1.0, 1.0, layers, steps)
    seq = sequential(1.0, 1.0, layers, steps)
    assert seq.makespan == layers * steps * 2.0
    assert pp.makespan == 2 * layers * steps * 1.0 + 1.0  # replica never idles, last attention
    assert pp.throughput / seq.throughput == pytest.approx(2.0, rel=0.01)
    assert pp.n_replicas == 1 and pp.conflicts == 0


def test_tiny_case_exact_times():
    # n = 2, 2 layers, 1 step, sized pool (t_a = t_m = 1): one replica alternates
    r = simulate(2, 1.0, 1.0, layers=2, steps=1)
    got = [(o.batch, o.layer, o.kind, o.resource, o.start, o.end) for o in r.ops]
    assert got == [
        (0, 0, "model", "replica1", 0.0, 1.0),
        (0, 0, "attn", "pool", 1.0, 2.0),
        (1, 0, "model", "replica1", 1.0, 2.0),
        (1, 0, "attn", "pool", 2.0, 3.0),
        (0, 1, "model", "replica1", 2.0, 3.0),
        (0, 1, "attn", "pool", 3.0, 4.0),
        (1, 1, "model", "replica1", 3.0, 4.0),
        (1, 1, "attn", "pool", 4.0, 5.0),
    ]
    assert r.makespan == 5.0 and r.conflicts == 0


def test_tiny_case_with_fast_pool_waits_exactly():
    # t_m = 2, t_a = 1 (pool twice too fast for n = 2): each second slice waits 1 for the replica
    r = simulate(2, 2.0, 1.0, layers=2, steps=1)
    model = [(o.batch, o.layer, o.ready, o.start, o.end) for o in r.ops if o.kind == "model"]
    assert model == [
        (0, 0, 0.0, 0.0, 2.0),
        (1, 0, 2.0, 2.0, 4.0),
        (0, 1, 3.0, 4.0, 6.0),
        (1, 1, 5.0, 6.0, 8.0),
    ]
    assert r.makespan == 9.0
    assert r.conflicts == 2 and r.wait_time == 2.0


def test_without_rotation_the_shared_replica_is_a_bottleneck():
    n, t_m = 4, 1.0
    pinned = simulate(n, t_m, sized_attn_slice(n, t_m), 4, 10, rotate=False)
    rotated = simulate(n, t_m, sized_attn_slice(n, t_m), 4, 10)
    assert pinned.bubble_fraction > 0.1
    assert pinned.makespan > 1.3 * rotated.makespan


def test_pool_with_parallel_lanes_is_conflict_free_but_not_bubble_free():
    # two lanes at half speed each: same pool throughput, longer attention per batch
    n, t_m = 4, 1.0
    r = simulate(n, t_m, 2 * sized_attn_slice(n, t_m), 4, 10, pool_capacity=2)
    assert r.conflicts == 0
    assert r.bubble_fraction > 0.1


def test_sweep_and_report_table():
    rows = sweep(range(2, 9), t_model_slice=1e-3, t_attn_slice=None, layers=4, steps=20)
    assert [r.n for r in rows] == list(range(2, 9))
    for r in rows:
        assert r.conflicts == 0 and r.bubble_fraction == pytest.approx(0.0, abs=1e-9)
        assert r.vs_sequential == pytest.approx(r.n, rel=0.03)
        assert r.vs_sequential_per_replica == pytest.approx(r.n / (r.n - 1), rel=0.03)
    fixed = sweep(range(2, 9), t_model_slice=1e-3, t_attn_slice=0.5e-3, layers=4, steps=20)
    by_n = {r.n: r for r in fixed}
    assert by_n[3].conflicts == 0 and by_n[3].bubble_fraction < 1e-9  # t_a = t_m / 2 at n = 3
    for n in range(4, 9):  # the pool bounds throughput at (t_m + t_a) / t_a = 3x sequential
        assert by_n[n].vs_sequential == pytest.approx(3.0, rel=0.03)
        assert by_n[n].bubble_fraction == pytest.approx(1 - 2 / (n - 1), abs=0.02)
    table = report_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 7
    assert lines[0].startswith("| n | replicas |")
    assert lines[2].startswith("| 2 | 1 |")


def test_invalid_arguments():
    with pytest.raises(ValueError):
        simulate(1, 1.0, 1.0, 2, 1)
    with pytest.raises(ValueError):
        simulate(3, 0.0, 1.0, 2, 1)
    with pytest.raises(ValueError):
        sized_attn_slice(1, 1.0)
