"""Serving metrics of a streaming load test, with the definitions of vLLM's serving benchmark
(`vllm bench serve`, formerly `benchmarks/benchmark_serving.py`). Pure functions over
per-request timelines: no locust, no numpy, so tests and `loadtest.report` share them.

Per request (times in seconds, `start` = when the request was sent):

- **TTFT**: first content chunk - start.
- **ITL** (inter-token latency): the gaps between consecutive content chunks, pooled over all
  requests (a chunk carrying several tokens is one gap, as in vLLM).
- **TPOT** (time per output token, excluding the first): (e2e - TTFT) / (output_tokens - 1),
  only for requests with more than one output token.
- **E2E** latency: the last data chunk - start.
- **Goodput**: successful requests per second of benchmark time that meet every SLO given
  (TTFT <= x, TPOT <= y, E2E <= z; an SLO left as None is not checked). As in vLLM, a request
  with one output token has TPOT 0 for this check. Failed requests never count.

Request and output-token throughput divide by the benchmark duration: from the first request
sent to the last one finished, failures included.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Goodput thresholds in ms; None = not checked. Defaults: MLPerf's Llama-2-70B server
    scenario (TTFT <= 2 s, TPOT <= 200 ms), the SLO pair most `--goodput` runs quote."""

    ttft_ms: float | None = 2000.0
    tpot_ms: float | None = 200.0
    e2e_ms: float | None = None

    def describe(self) -> str:
        parts = [
            f"{name} <= {value:g} ms"
            for name, value in (
                ("TTFT", self.ttft_ms),
                ("TPOT", self.tpot_ms),
                ("E2E", self.e2e_ms),
            )
            if value is not None
        ]
        return " and ".join(parts) or "none (every success counts)"


@dataclass(frozen=True)
class RequestRecord:
    """One request as the load generator saw it."""

    start: float  # when it was sent (any clock; only differences matter)
    ok: bool
    status: int = 200
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: tuple[float, ...] = ()
    error: str = ""

    @property
    def end(self) -> float:
        return self.start + (self.e2e_s or 0.0)


def ttft(start: float, chunk_times: Sequence[float]) -> float | None:
    """Time to the first content chunk; None when none came."""
    return chunk_times[0] - start if chunk_times else None


def itls(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive content chunks."""
    return [b - a for a, b in pairwise(chunk_times)]


def tpot(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """(e2e - TTFT) / (output_tokens - 1); None for fewer than two tokens."""
    if output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def record_from_timeline(
    start: float, chunk_times: Sequence[float], end: float, output_tokens: int
) -> RequestRecord:
    """A successful request from its send time, content-chunk times and last-chunk time."""
    return RequestRecord(
        start=start,
        ok=True,
        ttft_s=ttft(start, chunk_times),
        e2e_s=end - start,
        output_tokens=output_tokens,
        itl_s=tuple(itls(chunk_times)),
    )


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def meets_slo(rec: RequestRecord, slo: Slo) -> bool:
    """A successful request within every SLO set (vLLM's goodput check)."""
    if not rec.ok or rec.ttft_s is None or rec.e2e_s is None:
        return False
    tp = tpot(rec.ttft_s, rec.e2e_s, rec.output_tokens) or 0.0
    checks = ((slo.ttft_ms, rec.ttft_s), (slo.tpot_ms, tp), (slo.e2e_ms, rec.e2e_s))
    return all(limit is None or value * 1e3 <= limit for limit, value in checks)


@dataclass(frozen=True)
class Dist:
    """A latency distribution in ms."""

    n: int
    mean: float
    std: float
    pct: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, seconds: Iterable[float], percentiles: Sequence[int] = PERCENTILES) -> Dist:
        ms = [s * 1e3 for s in seconds]
        if not ms:
            return cls(0, math.nan, math.nan, {p: math.nan for p in percentiles})
        mean = sum(ms) / len(ms)
        std = math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms))  # numpy's std (ddof=0)
        return cls(len(ms), mean, std, {p: percentile(ms, p) for p in percentiles})


@dataclass(frozen=True)
class Summary:
    sent: int
    completed: int
    failed: int
    statuses: dict[str, int]
    duration_s: float
    request_throughput: float
    output_throughput: float
    goodput: float
    good: int
    slo: Slo
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist
    total_output_tokens: int


def benchmark_duration(records: Sequence[RequestRecord]) -> float:
    """First request sent to last request finished."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(
    records: Sequence[RequestRecord], slo: Slo = Slo(), duration_s: float | None = None
) -> Summary:
    """vLLM's `calculate_metrics` over one run."""
    done = [r for r in records if r.ok and r.ttft_s is not None and r.e2e_s is not None]
    duration = benchmark_duration(records) if duration_s is None else duration_s
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    statuses = Counter("ok" if r.ok else (r.error or str(r.status)) for r in records)
    tokens = sum(r.output_tokens for r in done)
    good = sum(meets_slo(r, slo) for r in done)
    tpots = [t for r in done if (t := tpot(r.ttft_s, r.e2e_s, r.output_tokens)) is not None]
    return Summary(
        sent=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        statuses=dict(statuses.most_common()),
        duration_s=duration,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(tokens),
        goodput=per_s(good),
        good=good,
        slo=slo,
        ttft=Dist.of(r.ttft_s for r in done),
        tpot=Dist.of(tpots),
        itl=Dist.of(g for r in done for g in r.itl_s),
        e2e=Dist.of(r.e2e_s for r in done),
        total_output_tokens=tokens,
    )
