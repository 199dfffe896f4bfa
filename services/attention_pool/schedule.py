"""Discrete-event simulation of Lamina's rotational staggered pipelining (papers.md 3.2, 4).

n micro-batches share n - 1 model replicas and one attention pool. Each batch repeats, per
layer, a model slice (on a replica, `t_model_slice`) then attention (on the pool,
`t_attn_slice`). The paper's rule:

- replica j starts t_m / (n - 1) after replica j - 1, i.e. batch j is released at
  j * t_m / (n - 1);
- the k-th model slice of batch j (k counts over layers and steps) runs on replica
  ((j + k) mod (n - 1)) + 1;
- the pool is sized so that t_a = t_m / (n - 1).

Resources do one thing at a time. The pool is ONE resource by default (`pool_capacity=1`):
with head-level partitioning every memory device holds a share of every batch's KV, so one
batch's attention occupies the whole pool for t_a. `pool_capacity=c` models c independent
attention lanes instead (each attention still takes t_a).

Every operation starts at max(its input is ready, its resource is free); a resource serves
waiting operations in the order they became ready. A *conflict* is an operation whose input
was ready while its resource was still busy: in the fixed timetable the rule prescribes, that
operation would overlap another on the same resource. The rule is conflict-free when no
operation ever waits (the first slice of every batch is released by the stagger, not by data,
so its release time counts as ready).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

OpKind = Literal["model", "attn"]


@dataclass(frozen=True)
class Op:
    batch: int
    step: int
    layer: int
    kind: OpKind
    resource: str  # "replica1".."replicaR", "pool" (or "pool1".. with capacity > 1)
    ready: float
    start: float
    end: float

    @property
    def wait(self) -> float:
        return self.start - self.ready


@dataclass(frozen=True)
class ScheduleResult:
    n_batches: int
    n_replicas: int
    layers: int
    steps: int
    t_model_slice: float
    t_attn_slice: float
    batch_size: int
    makespan: float
    replica_utilisation: float  # busy / (replicas * makespan)
    pool_utilisation: float  # busy / (capacity * makespan)
    steady_start: float  # all batches in flight from here ...
    steady_end: float  # ... until the first batch finishes
    steady_replica_utilisation: float
    steady_pool_utilisation: float
    bubble_time: float  # replica idle time inside the steady window, summed over replicas
    conflicts: int  # operations that found their resource busy when ready
    wait_time: float  # their total wait
    ops: tuple[Op, ...]

    @property
    def tokens(self) -> int:
        return self.n_batches * self.batch_size * self.steps

    @property
    def throughput(self) -> float:
        """Tokens per second (times are seconds)."""
        return self.tokens / self.makespan

    @property
    def bubble_fraction(self) -> float:
        span = (self.steady_end - self.steady_start) * self.n_replicas
        return self.bubble_time / span if span > 0 else 0.0

    @property
    def conflict_free(self) -> bool:
        return self.conflicts == 0


def _busy_in(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in intervals)


def _run(
    n_batches: int,
    n_replicas: int,
    t_m: float,
    t_a: float,
    layers: int,
    steps: int,
    stagger: float,
    batch_size: int,
    pool_capacity: int,
    rotate: bool = True,
) -> ScheduleResult:
    if n_batches < 1 or n_replicas < 1 or layers < 1 or steps < 1 or pool_capacity < 1:
        raise ValueError("n_batches, n_replicas, layers, steps and pool_capacity must be >= 1")
    if t_m <= 0 or t_a < 0:
        raise ValueError("t_model_slice must be > 0 and t_attn_slice >= 0")
    eps = 1e-9 * (t_m + t_a)
    n_slices = layers * steps
    replica_free = [0.0] * n_replicas
    pool_free = [0.0] * pool_capacity
    # heap of ready operations: (ready, batch, slice index k, kind order); kind 0 = model
    heap: list[tuple[float, int, int, int]] = [(j * stagger, j, 0, 0) for j in range(n_batches)]
    heapq.heapify(heap)
    ops: list[Op] = []
    conflicts, wait_time = 0, 0.0
    while heap:
        ready, j, k, kind = heapq.heappop(heap)
        if kind == 0:
            r = (j + k) % n_replicas if rotate else j % n_replicas
            start = max(ready, replica_free[r])
            end = start + t_m
            replica_free[r] = end
            resource = f"replica{r + 1}"
            heapq.heappush(heap, (end, j, k, 1))
        else:
            lane = min(range(pool_capacity), key=lambda i: pool_free[i])
            start = max(ready, pool_free[lane])
            end = start + t_a
            pool_free[lane] = end
            resource = "pool" if pool_capacity == 1 else f"pool{lane + 1}"
            if k + 1 < n_slices:
                heapq.heappush(heap, (end, j, k + 1, 0))
        if start - ready > eps:
            conflicts += 1
            wait_time += start - ready
        ops.append(
            Op(
                batch=j,
                step=k // layers,
                layer=k % layers,
                kind="model" if kind == 0 else "attn",
                resource=resource,
                ready=ready,
                start=start,
                end=end,
            )
        )

    makespan = max(op.end for op in ops)
    model_iv: list[list[tuple[float, float]]] = [[] for _ in range(n_replicas)]
    pool_iv: list[tuple[float, float]] = []
    for op in ops:
        if op.kind == "model":
            model_iv[int(op.resource.removeprefix("replica")) - 1].append((op.start, op.end))
        else:
            pool_iv.append((op.start, op.end))
    steady_start = max(min(op.start for op in ops if op.batch == j) for j in range(n_batches))
    steady_end = min(max(op.end for op in ops if op.batch == j) for j in range(n_batches))
    window = max(0.0, steady_end - steady_start)
    busy_steady = [_busy_in(iv, steady_start, steady_end) for iv in model_iv]
    model_busy = n_batches * n_slices * t_m
    pool_busy = n_batches * n_slices * t_a
    return ScheduleResult(
        n_batches=n_batches,
        n_replicas=n_replicas,
        layers=layers,
        steps=steps,
        t_model_slice=t_m,
        t_attn_slice=t_a,
        batch_size=batch_size,
        makespan=makespan,
        replica_utilisation=model_busy / (n_replicas * makespan),
        pool_utilisation=pool_busy / (pool_capacity * makespan),
        steady_start=steady_start,
        steady_end=steady_end,
        steady_replica_utilisation=(
            sum(busy_steady) / (n_replicas * window) if window > 0 else 0.0
        ),
        steady_pool_utilisation=(
            _busy_in(pool_iv, steady_start, steady_end) / (pool_capacity * window)
            if window > 0
            else 0.0
        ),
        bubble_time=sum(window - b for b in busy_steady),
        conflicts=conflicts,
        wait_time=wait_time,
        ops=tuple(sorted(ops, key=lambda o: (o.start, o.resource))),
    )


def sized_attn_slice(n: int, t_model_slice: float) -> float:
    """The pool sizing rule: t_a = t_m / (n - 1)."""
    if n < 2:
        raise ValueError("rotational staggering needs n >= 2 batches")
    return t_model_slice / (n - 1)


def simulate(
    n: int,
    t_model_slice: float,
    t_attn_slice: float,
    layers: int,
    steps: int,
    batch_size: int = 1,
    pool_capacity: int = 1,
    rotate: bool = True,
) -> ScheduleResult:
    """n batches on n - 1 replicas and one pool, by the rotational staggered rule.

    rotate=False pins batch j to replica (j mod (n - 1)) + 1 instead (no context migration),
    for comparison: replica 1 then carries two batches.
    """
    if n < 2:
        raise ValueError("rotational staggering needs n >= 2 batches")
    return _run(
        n_batches=n,
        n_replicas=n - 1,
        t_m=t_model_slice,
        t_a=t_attn_slice,
        layers=layers,
        steps=steps,
        stagger=t_model_slice / (n - 1),
        batch_size=batch_size,
        pool_capacity=pool_capacity,
        rotate=rotate,
    )


def ping_pong(
    t_model_slice: float, t_attn_slice: float, layers: int, steps: int, batch_size: int = 1
) -> ScheduleResult:
    """n = 2: two batches alternate on one replica; while one is at the pool the other runs."""
    return simulate(2, t_model_slice, t_attn_slice, layers, steps, batch_size)


def sequential(
    t_model_slice: float, t_attn_slice: float, layers: int, steps: int, batch_size: int = 1
) -> ScheduleResult:
    """Baseline: one batch, one replica, no overlap: layers * (t_m + t_a) per step."""
    return _run(
        n_batches=1,
        n_replicas=1,
        t_m=t_model_slice,
        t_a=t_attn_slice,
        layers=layers,
        steps=steps,
        stagger=0.0,
        batch_size=batch_size,
        pool_capacity=1,
    )


# --- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    n: int
    replicas: int
    t_model_slice: float
    t_attn_slice: float
    throughput: float  # tokens/s
    vs_sequential: float  # throughput / sequential throughput (same t_m, t_a)
    vs_sequential_per_replica: float
    replica_utilisation: float  # steady state
    pool_utilisation: float  # steady state
    bubble_fraction: float
    conflicts: int


def table_row(result: ScheduleResult, baseline: ScheduleResult) -> TableRow:
    ratio = result.throughput / baseline.throughput
    return TableRow(
        n=result.n_batches,
        replicas=result.n_replicas,
        t_model_slice=result.t_model_slice,
        t_attn_slice=result.t_attn_slice,
        throughput=result.throughput,
        vs_sequential=ratio,
        vs_sequential_per_replica=ratio / result.n_replicas,
        replica_utilisation=result.steady_replica_utilisation,
        pool_utilisation=result.steady_pool_utilisation,
        bubble_fraction=result.bubble_fraction,
        conflicts=result.conflicts,
    )


def sweep(
    ns: Sequence[int],
    t_model_slice: float,
    t_attn_slice: float | None,
    layers: int,
    steps: int,
    batch_size: int = 1,
) -> list[TableRow]:
    """One row per n; t_attn_slice None sizes the pool by the rule, t_a = t_m / (n - 1)."""
    rows = []
    for n in ns:
        t_a = sized_attn_slice(n, t_model_slice) if t_attn_slice is None else t_attn_slice
        result = simulate(n, t_model_slice, t_a, layers, steps, batch_size)
        baseline = sequential(t_model_slice, t_a, layers, steps, batch_size)
        rows.append(table_row(result, baseline))
    return rows


def report_table(rows: Sequence[TableRow]) -> str:
    """Markdown table: throughput vs sequential, steady-state utilisation, bubbles, conflicts."""
    head = [
        "n",
        "replicas",
        "t_m ms",
        "t_a ms",
        "tok/s",
        "x sequential",
        "x seq / replica",
        "replica util",
        "pool util",
        "bubble frac",
        "conflicts",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r.n),
            str(r.replicas),
            f"{r.t_model_slice * 1e3:.3f}",
            f"{r.t_attn_slice * 1e3:.3f}",
            f"{r.throughput:.1f}",
            f"{r.vs_sequential:.2f}",
            f"{r.vs_sequential_per_replica:.2f}",
            f"{r.replica_utilisation:.3f}",
            f"{r.pool_utilisation:.3f}",
            f"{r.bubble_fraction:.3f}",
            str(r.conflicts),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
