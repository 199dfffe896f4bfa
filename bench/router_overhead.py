"""`python -m bench.router_overhead`: what the router adds per request, against calling the
expert directly.

Starts one real smollm2 edge node (OpenAI HTTP + gRPC, TANDEM_THREADS=1) and one router in
front of it (named expert only, no gate), all on loopback, then sends the same greedy
completion request `--requests` times to each, interleaved A/B (the order alternates) so
drift and order effects cancel:

- direct: POST edge `/v1/completions` (the edge node's own HTTP front door);
- routed: POST router `/v1/completions` (router HTTP front door, validation and budgets,
  RouteReport, then gRPC to the edge node's gRPC server).

With `--baseline REF` (default: the commit before chunked gRPC, issue 12) a third target
runs in the same interleaving: the router as it was at REF (`git archive` of `services/` and
`tandem/` into a temporary directory, started with `bench.run_from`), against the same edge
node, so before and after are measured in one run on the same machine state.

One persistent `httpx.Client` per target; the time is the client's wall time per request.
Both must return the same text and `usage.completion_tokens` (checked). A streaming variant
measures the time to the first content chunk (TTFT) and to the end of the stream.

Then, in this process (after the services are stopped), the extra cost of `"model": "auto"`:
the gate's prompt features (`ModelFeaturizer`, smollm2 up to half its layers, one torch
thread as in the router) and the MoE² coarse level on a cache hit and miss plus the gate's
fine ranking. The router computes features only when the coarse subset S has more than one
expert.

Writes docs/bench/router_overhead.md and .json; prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml

from bench.machine import cpu_name
from tandem.launch import ServiceProcess, free_port

OUT = Path("docs/bench")
PROMPT = "The three primary colors are"
MODEL = "smollm2"
# The router before issue 12's work (one gRPC message per token, a task per request): the
# "before" target. `--baseline none` skips it.
BASELINE_REF = "072b2352cf4d2c446d969297eed4b6ffc93806a0"


# -- statistics (pure) -------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (the
    numpy default)."""
    if not xs:
        raise ValueError("percentile of an empty sample")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Summary:
        return cls(len(xs), percentile(xs, 50), percentile(xs, 99), statistics.fmean(xs))


@dataclass(frozen=True)
class Row:
    """One metric, direct vs routed, in ms."""

    metric: str
    direct: Summary
    routed: Summary
    paired_median_ms: float  # median over pairs of (routed_i - direct_i)

    @property
    def overhead_p50_ms(self) -> float:
        return self.routed.p50 - self.direct.p50

    @property
    def overhead_p99_ms(self) -> float:
        return self.routed.p99 - self.direct.p99

    @property
    def ratio_p50(self) -> float:
        return self.routed.p50 / self.direct.p50

    @property
    def ratio_p99(self) -> float:
        return self.routed.p99 / self.direct.p99

    @classmethod
    def of(cls, metric: str, direct: Sequence[float], routed: Sequence[float]) -> Row:
        if len(direct) != len(routed):
            raise ValueError("direct and routed samples must pair up")
        diffs = [r - d for d, r in zip(direct, routed, strict=True)]
        return cls(metric, Summary.of(direct), Summary.of(routed), statistics.median(diffs))

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "overhead_p50_ms": self.overhead_p50_ms,
            "overhead_p99_ms": self.overhead_p99_ms,
            "ratio_p50": self.ratio_p50,
            "ratio_p99": self.ratio_p99,
        }


# -- the services ------------------------------------------------------------------------


def router_config(port: int, grpc_port: int) -> dict:
    return {
        "host": "127.0.0.1",
        "port": port,
        "health": {"interval_s": 1.0, "timeout_s": 1.0, "failure_threshold": 2},  # the default
        "gate": None,
        "experts": [
            {
                "id": MODEL,
                "kind": "edge",
                "device": "cpu",
                "replicas": [f"127.0.0.1:{grpc_port}"],
            }
        ],
    }


def extract_baseline(ref: str, into: Path) -> Path:
    """The router's code (`services/`, `tandem/`) at git `ref`, in `into`/code."""
    root = Path(__file__).resolve().parents[1]
    code = into / "code"
    code.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "services", "tandem"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code


def start_services(
    tmp: Path, baseline: Path | None = None
) -> tuple[list[ServiceProcess], dict[str, str]]:
    """(processes, base URL per target: direct = the edge node, routed = the router,
    before = the router from `baseline`'s code if given), all serving."""
    procs: list[ServiceProcess] = []
    try:
        edge_port, grpc_port, router_port = free_port(), free_port(), free_port()
        edge = ServiceProcess.start(
            "edge",
            [
                "services.edge_node.main",
                "--model",
                MODEL,
                "--port",
                str(edge_port),
                "--grpc-port",
                str(grpc_port),
            ],
            tmp,
            env={"TANDEM_THREADS": "1"},
        )
        procs.append(edge)
        config = tmp / "router.yaml"
        config.write_text(yaml.safe_dump(router_config(router_port, grpc_port)))
        router = ServiceProcess.start(
            "router", ["services.router.main", "--config", str(config)], tmp
        )
        procs.append(router)
        urls = {
            "direct": f"http://127.0.0.1:{edge_port}",
            "routed": f"http://127.0.0.1:{router_port}",
        }
        if baseline is not None:
            old_port = free_port()
            old_config = tmp / "router_before.yaml"
            old_config.write_text(yaml.safe_dump(router_config(old_port, grpc_port)))
            args = ["services.router.main", "--config", str(old_config)]
            old = ServiceProcess.start(
                "router_before", ["bench.run_from", str(baseline), *args], tmp
            )
            procs.append(old)
            urls["before"] = f"http://127.0.0.1:{old_port}"
        edge.wait_http(f"{urls['direct']}/health", timeout=150)
        router.wait_http(f"{urls['routed']}/ready", timeout=60)
        if baseline is not None:
            procs[-1].wait_http(f"{urls['before']}/ready", timeout=60)
        return procs, urls
    except BaseException:
        stop_all(procs)
        raise


def stop_all(procs: Sequence[ServiceProcess]) -> None:
    for p in reversed(procs):
        try:
            p.stop(grace_s=10)
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"stopping {p.name}: {exc}", flush=True)
            p.kill()


# -- the requests ------------------------------------------------------------------------


def cpu_ms(pid: int) -> float:
    """CPU time of every live thread of `pid` so far, in ms (ns resolution, from
    /proc/<pid>/task/*/schedstat; 0 where unavailable)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


@dataclass
class Call:
    ms: float
    text: str
    completion_tokens: int | None
    headers: dict[str, str]


def complete(client: httpx.Client, body: dict) -> Call:
    t0 = time.perf_counter()
    r = client.post("/v1/completions", json=body)
    ms = (time.perf_counter() - t0) * 1e3
    if r.status_code != 200:
        raise RuntimeError(f"{client.base_url}: {r.status_code} {r.text[:500]}")
    data = r.json()
    return Call(
        ms,
        data["choices"][0]["text"],
        (data.get("usage") or {}).get("completion_tokens"),
        {k: v for k, v in r.headers.items() if k.startswith("x-tandem")},
    )


@dataclass
class StreamCall:
    ttft_ms: float
    total_ms: float
    text: str


def stream(client: httpx.Client, body: dict) -> StreamCall:
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{client.base_url}: {r.status_code} {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"{client.base_url}: stream error {chunk['error']}")
            text = "".join(c.get("text") or "" for c in chunk.get("choices") or ())
            if text and ttft is None:
                ttft = (time.perf_counter() - t0) * 1e3
            parts.append(text)
    total = (time.perf_counter() - t0) * 1e3
    if ttft is None:
        raise RuntimeError(f"{client.base_url}: the stream had no content")
    return StreamCall(ttft, total, "".join(parts))


def _rounds(clients: dict[str, httpx.Client], n: int):
    """`n` rounds over every target, the order rotating each round (so each target is
    first, second, ... equally often): yields (round, name, client)."""
    names = list(clients)
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            yield i, name, clients[name]


def _interleaved(
    clients: dict[str, httpx.Client],
    body: dict,
    n: int,
    reference: Call,
    pids: dict[str, int],
) -> dict[str, list]:
    """`n` non-streaming rounds over the targets in rotating order; each answer must equal
    `reference`. Also the CPU time each service spent per request (read between requests,
    outside the timed window)."""
    out: dict[str, list] = {key: [] for key in clients}
    out.update({f"cpu_{p}_{k}": [] for p in pids for k in clients})
    for i, key, client in _rounds(clients, n):
        before = {p: cpu_ms(pid) for p, pid in pids.items()}
        call = complete(client, body)
        for p, pid in pids.items():
            out[f"cpu_{p}_{key}"].append(cpu_ms(pid) - before[p])
        if call.text != reference.text or call.completion_tokens != reference.completion_tokens:
            raise RuntimeError(
                f"{key} #{i}: {call.text!r} ({call.completion_tokens} tokens) differs "
                f"from {reference.text!r} ({reference.completion_tokens} tokens)"
            )
        out[key].append(call)
    return out


def measure_http(
    urls: dict[str, str],
    body: dict,
    pids: dict[str, int],
    *,
    n: int,
    n_stream: int,
    long_tokens: int,
    n_long: int,
) -> dict:
    """Non-streaming rounds, streaming rounds, and (if `n_long`) non-streaming rounds with
    `long_tokens` new tokens, to see whether the overhead grows with the answer."""
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
    try:
        for _ in range(3):  # warm-up: connections, the router's lazy gRPC channel
            for client in clients.values():
                complete(client, body)
                stream(client, body)
        reference = complete(clients["direct"], body)
        out = {"reference": reference, "short": _interleaved(clients, body, n, reference, pids)}
        streamed: dict[str, list[StreamCall]] = {key: [] for key in clients}
        for i, key, client in _rounds(clients, n_stream):
            call = stream(client, body)
            if call.text != reference.text:
                raise RuntimeError(f"{key} #{i}: streamed {call.text!r} != {reference.text!r}")
            streamed[key].append(call)
        out["stream"] = streamed
        if n_long:
            long_body = {**body, "max_tokens": long_tokens}
            out["long_reference"] = ref = complete(clients["direct"], long_body)
            out["long"] = _interleaved(clients, long_body, n_long, ref, pids)
    finally:
        for client in clients.values():
            client.close()
    return out


# -- the auto path, in process -----------------------------------------------------------


def time_ms(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_auto(prompt: str, max_tokens: int, repeat: int) -> dict:
    import torch

    from services.router.budget import RequestBudget
    from services.router.features import ModelFeaturizer
    from services.router.gate import Gate
    from services.router.moe2 import BudgetInfeasible, Moe2Selector
    from services.router.planner import SubsetLossTable
    from services.router.predictor import Predictor, Shape
    from services.router.profiles import DEVICE_PROFILES, ExpertSpec
    from services.router.reference import DEFAULT_DEVICES, REFERENCE_TIMINGS
    from services.router.telemetry import LatencyTelemetry

    torch.set_num_threads(1)  # as the router does
    t0 = time.perf_counter()
    featurizer = ModelFeaturizer.load(MODEL)
    load_s = time.perf_counter() - t0

    async def features_ms() -> tuple[list[float], object]:
        feats = await featurizer.features(prompt)  # warm-up
        out = []
        for _ in range(repeat):
            t = time.perf_counter()
            feats = await featurizer.features(prompt)
            out.append((time.perf_counter() - t) * 1e3)
        return out, feats

    feat_ms, feats = asyncio.run(features_ms())

    gate = Gate.load(Path("artifacts/gate/gate.pt"))
    losses = SubsetLossTable.load(Path("artifacts/gate/subset_loss.json"))
    specs = {
        e: ExpertSpec(
            e,
            DEVICE_PROFILES[DEFAULT_DEVICES[e]],
            REFERENCE_TIMINGS[e].decode_s_per_token,
            REFERENCE_TIMINGS[e].prefill_s_per_token,
        )
        for e in gate.experts
    }
    predictor = Predictor(specs, LatencyTelemetry())
    selector = Moe2Selector(gate, losses, predictor, healthy=lambda: set(specs))
    shape = Shape.estimate(len(prompt.encode()), max_tokens)

    def budget(energy_j: float | None) -> RequestBudget:
        return RequestBudget(latency_ms=None, energy_j=energy_j, best_effort=False, top_k=1)

    # No budgets, and the smallest energy budget (just above one expert's modelled energy,
    # past the grid's rounding down) whose subset S has more than one expert, if any.
    budgets: dict[str, float | None] = {"no budget": None}
    for e in sorted(specs, key=lambda e: predictor.energy_j(e, shape.rounded_up())):
        energy = round(1.3 * predictor.energy_j(e, shape.rounded_up()), 2)
        try:
            subset = selector.coarse(budget(energy), shape).subset
        except BudgetInfeasible:
            continue
        if len(subset) > 1:
            budgets[f"energy_j={energy:g}"] = energy
            break

    cases = []
    for name, energy in budgets.items():
        b = budget(energy)
        subset = selector.coarse(b, shape).subset

        def miss(b: RequestBudget = b) -> None:
            selector.caches.clear()
            selector.coarse(b, shape)

        cases.append(
            {
                "budget": name,
                "subset": list(subset),
                "features_needed": len(subset) > 1,
                "coarse_miss_ms": time_ms(miss, repeat),
                "coarse_hit_ms": time_ms(lambda b=b: selector.coarse(b, shape), repeat * 5),
                "rank_ms": time_ms(lambda s=subset: selector.rank(feats, s), repeat * 5),
            }
        )
    return {"feature_model_load_s": load_s, "features_ms": feat_ms, "cases": cases}


# -- report ------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| metric (ms) | n | direct p50 | direct p99 | direct mean | routed p50 | routed p99 "
        "| routed mean | overhead p50 | overhead p99 | ratio p50 | ratio p99 | paired median |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, t = r.direct, r.routed
        lines.append(
            f"| {r.metric} | {d.n} | {d.p50:.1f} | {d.p99:.1f} | {d.mean:.1f} | {t.p50:.1f} "
            f"| {t.p99:.1f} | {t.mean:.1f} | {r.overhead_p50_ms:+.1f} | {r.overhead_p99_ms:+.1f} "
            f"| {r.ratio_p50:.3f} | {r.ratio_p99:.3f} | {r.paired_median_ms:+.1f} |"
        )
    return lines


def cpu_table(cpu: dict[str, dict[str, float]]) -> list[str]:
    before = all("router_before_before" in c for c in cpu.values())
    head = "| requests | edge CPU / direct request | edge CPU / routed request "
    head += "| router CPU / routed request |"
    rule = "|---|---:|---:|---:|"
    if before:
        head += " edge CPU / request via the router before | router before CPU / request |"
        rule += "---:|---:|"
    lines = [head, rule]
    for name, c in cpu.items():
        line = (
            f"| {name} | {c['edge_direct']:.1f} | {c['edge_routed']:.1f} "
            f"| {c['router_routed']:.1f} |"
        )
        if before:
            line += f" {c['edge_before']:.1f} | {c['router_before_before']:.1f} |"
        lines.append(line)
    return lines


def before_after_table(before: Sequence[Row], after: Sequence[Row]) -> list[str]:
    lines = [
        "| metric (ms) | before: routed p50 | before: overhead p50 | before: paired median "
        "| after: routed p50 | after: overhead p50 | after: paired median |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b, a in zip(before, after, strict=True):
        lines.append(
            f"| {a.metric} | {b.routed.p50:.1f} | {b.overhead_p50_ms:+.1f} "
            f"| {b.paired_median_ms:+.1f} | {a.routed.p50:.1f} | {a.overhead_p50_ms:+.1f} "
            f"| {a.paired_median_ms:+.1f} |"
        )
    return lines


def auto_table(auto: dict) -> list[str]:
    f = Summary.of(auto["features_ms"])
    lines = [
        "| step (ms) | budget | S | n | p50 | p99 | mean |",
        "|---|---|---|---:|---:|---:|---:|",
        f"| gate features (smollm2, half its layers, 1 thread) | any with \\|S\\| > 1 | | {f.n} "
        f"| {f.p50:.2f} | {f.p99:.2f} | {f.mean:.2f} |",
    ]
    for case in auto["cases"]:
        subset = ", ".join(case["subset"])
        for key, name in (
            ("coarse_miss_ms", "MoE² coarse level, cache miss (solve)"),
            ("coarse_hit_ms", "MoE² coarse level, cache hit"),
            ("rank_ms", "gate fine ranking in S"),
        ):
            s = Summary.of(case[key])
            lines.append(
                f"| {name} | {case['budget']} | {subset} | {s.n} | {s.p50:.3f} | {s.p99:.3f} "
                f"| {s.mean:.3f} |"
            )
    return lines


def render(
    rows: Sequence[Row], auto: dict | None, meta: dict, before: Sequence[Row] | None = None
) -> str:
    ns = rows[0]
    lines = [
        "# Router overhead per request: through the router vs the expert directly",
        "",
        f"Machine: {meta['machine']}. Generated by `python -m bench.router_overhead` "
        f"(run time {meta['wall_s']:.0f} s); every number below is from that one run.",
        "",
        "Setup: one smollm2 edge node (`services.edge_node.main`, registry default "
        "quantisation, TANDEM_THREADS=1) and one router (`services.router.main`, the expert "
        "by name, no gate) in front of its gRPC port, both on loopback on this machine; the "
        "client is this process. Request: `/v1/completions`, prompt "
        f"{meta['prompt']!r}, temperature 0, max_tokens {meta['max_tokens']} (and "
        f"{meta['long_tokens']} in the last row). Direct = the edge node's own HTTP API; "
        "routed = the router's HTTP API, which forwards over gRPC"
        + (
            f"; before = the router's code at `{meta['baseline'][:12]}` (before issue 12: one "
            "gRPC message per token), started from a `git archive` of that commit, in front "
            "of the same (current) edge node, whose gRPC server, asked by that router for a "
            "stream, sends one message per token at batch 1 as the old server did"
            if before is not None
            else ""
        )
        + ". Requests go round the targets, the order rotating every round, one persistent "
        "HTTP connection per target, after 3 warm-up requests each. Every answer was checked "
        "to be the same text "
        f"({meta['completion_tokens']} completion tokens: {meta['text']!r}). Times are client "
        "wall times in ms; overhead = routed − direct of the same statistic; ratio = routed / "
        "direct; paired median = median over the interleaved pairs of (routed − direct), the "
        "most drift-robust estimate.",
        "",
        *table(rows),
        "",
        f"With {ns.direct.n} samples the p99 is about the second-largest sample: read it as "
        "the tail's order of magnitude, not a precise figure. The box has 2 cores shared by "
        "the client, the router and the edge node (and whatever else ran), so tails are noisy.",
    ]
    if before is not None:
        lines += [
            "",
            "## Before and after, in this run",
            "",
            "The router before this change and after it, interleaved with the direct calls "
            "(overhead = target − direct):",
            "",
            *before_after_table(before, rows),
        ]
    if meta.get("headers"):
        lines += [
            "",
            "Router response headers (one non-streaming request): "
            + ", ".join(f"`{k}: {v}`" for k, v in sorted(meta["headers"].items()))
            + ".",
        ]
    if meta.get("router_gap_ms") is not None:
        lines += [
            "",
            "Where the time goes: the router's own `x-tandem-latency-ms` (routed engine start "
            "to last chunk, inside the router) is on the median "
            f"{meta['router_gap_ms']:.1f} ms below the client's wall time of the same request "
            "(paired): that is the router's HTTP front door (body parse, validation, budgets, "
            "response) plus the client's loopback HTTP hop — the direct path pays a similar "
            "front door and hop at the edge node. The rest of the overhead is inside the "
            "routed engine: the gRPC call and the edge node's gRPC server.",
            "",
            "CPU time per request (ms, mean; per-thread schedstat of each service process, "
            "read between requests):",
            "",
            *cpu_table(meta["cpu_ms"]),
        ]
    if auto is not None:
        lines += [
            "",
            '## The extra cost of `"model": "auto"` (in process, after the services stopped)',
            "",
            "The router computes the gate features only when the coarse subset S has more "
            "than one expert; the coarse level is cached per budget and shape class (a miss "
            "is paid once per class, and again when health or telemetry changes). S below is "
            "for this request's shape, the shipped gate and subset-loss table, and the "
            "reference timings on the default devices (`services.router.reference`), top_k 1.",
            "",
            *auto_table(auto),
        ]
    lines += ["", "## Reading", "", *meta["discussion"], ""]
    return "\n".join(lines)


def discussion(
    rows: Sequence[Row], meta: dict, auto: dict | None, before: Sequence[Row] | None = None
) -> list[str]:
    by = {r.metric: r for r in rows}
    ns = rows[0]
    met = "met" if ns.overhead_p50_ms < 2.0 and ns.paired_median_ms < 2.0 else "not met"
    out = [
        f"- Target (issue 12): the router adds under 2 ms at the median to an "
        f"{meta['completion_tokens']}-token answer. Here: {ns.overhead_p50_ms:+.1f} ms "
        f"(p50 difference), {ns.paired_median_ms:+.1f} ms (paired median): {met}."
        + (
            f" Before this change, in the same run: {before[0].overhead_p50_ms:+.1f} ms "
            f"(p50 difference), {before[0].paired_median_ms:+.1f} ms (paired median)."
            if before is not None
            else ""
        ),
        f"- Named expert, non-streaming, {meta['completion_tokens']} tokens: the router adds "
        f"{ns.overhead_p50_ms:+.1f} ms at the median ({(ns.ratio_p50 - 1) * 100:+.1f}%; "
        f"paired median {ns.paired_median_ms:+.1f} ms) to a {ns.direct.p50:.0f} ms request, "
        f"{ns.overhead_p99_ms:+.1f} ms at p99. The extra work is one more hop: the router's "
        "HTTP front door (JSON parse, the edge node's request validation reused, budget "
        "parsing, RouteReport and `x-tandem-*` headers) and an HTTP→gRPC relay to the edge "
        "node's gRPC server. None of it is model compute.",
    ]
    ttft = by.get("streaming TTFT")
    if ttft is not None:
        out.append(
            f"- Streaming: time to the first content chunk changes by "
            f"{ttft.overhead_p50_ms:+.1f} ms at the median (paired {ttft.paired_median_ms:+.1f} "
            f"ms, ratio {ttft.ratio_p50:.2f}): the per-request part of the hop, before any "
            "token is relayed."
        )
    long = next((r for r in rows if r.metric.startswith("non-streaming, ")), None)
    if long is not None:
        extra = meta["long_completion_tokens"] - meta["completion_tokens"]
        per_token = (long.paired_median_ms - ns.paired_median_ms) / extra
        c_short = meta["cpu_ms"][f"{meta['completion_tokens']} tokens"]
        c_long = meta["cpu_ms"][f"{meta['long_completion_tokens']} tokens"]
        router_tok = (c_long["router_routed"] - c_short["router_routed"]) / extra
        edge_tok = (
            (c_long["edge_routed"] - c_long["edge_direct"])
            - (c_short["edge_routed"] - c_short["edge_direct"])
        ) / extra
        out.append(
            f"- Per token: with {meta['long_completion_tokens']} tokens the overhead is "
            f"{long.paired_median_ms:+.1f} ms (paired median; ratio {long.ratio_p50:.3f}), "
            f"i.e. {per_token:+.2f} ms per extra token on top of the per-request part. A "
            "non-streaming answer crosses gRPC as one message (`whole_answer`); a stream as "
            "whatever the engine produced while the previous write was in flight (one "
            "message per token only when the engine is slower than the stream, as at batch "
            f"1). Per extra token the router spends {router_tok:+.2f} ms CPU and the edge "
            f"node {edge_tok:+.2f} ms more CPU when it serves over gRPC than over HTTP (table "
            "above)."
        )
        if "router_before_before" in c_short:
            old_router = (c_long["router_before_before"] - c_short["router_before_before"]) / extra
            old_edge = (
                (c_long["edge_before"] - c_long["edge_direct"])
                - (c_short["edge_before"] - c_short["edge_direct"])
            ) / extra
            old_long = before[-1] if before is not None else None
            out[-1] += (
                f" The router before this change (one message per token), in the same run: "
                f"{old_router:+.2f} ms router CPU and {old_edge:+.2f} ms edge CPU per extra "
                "token"
                + (
                    f", {old_long.paired_median_ms:+.1f} ms overhead at "
                    f"{meta['long_completion_tokens']} tokens (paired median)."
                    if old_long is not None
                    else "."
                )
            )
    cpu = meta["cpu_ms"].get(f"{meta['completion_tokens']} tokens")
    if cpu:
        out.append(
            f"- CPU: the router burns {cpu['router_routed']:.1f} ms per routed request; the "
            f"edge node {cpu['edge_routed']:.1f} ms per routed (gRPC) request against "
            f"{cpu['edge_direct']:.1f} ms per direct (HTTP) one. Generation (the edge "
            "node's decode) dominates every request by far; the router's own CPU per "
            "request is small next to it."
            + (
                f" The router before this change burned {cpu['router_before_before']:.1f} ms "
                "per request in the same run."
                if "router_before_before" in cpu
                else ""
            )
        )
    if auto is not None:
        f = Summary.of(auto["features_ms"])
        default = auto["cases"][0]
        multi = next((c for c in auto["cases"] if c["features_needed"]), None)
        text = f'- `"model": "auto"`: with no budgets S = {{{", ".join(default["subset"])}}}' + (
            ", a single expert, so the router skips the features and auto costs only "
            f"the cached coarse lookup (~{Summary.of(default['coarse_hit_ms']).p50 * 1e3:.0f}"
            " µs)."
            if not default["features_needed"]
            else "."
        )
        if multi is not None:
            text += (
                f" With {multi['budget']} S = {{{', '.join(multi['subset'])}}}, and the gate "
                f"features cost p50 {f.p50:.1f} ms / p99 {f.p99:.1f} ms (one forward of "
                "half of smollm2 over the prompt on one thread, serialised by a lock, so "
                "concurrent auto requests queue on it) — more than the hop itself."
            )
        miss = max(Summary.of(c["coarse_miss_ms"]).p50 for c in auto["cases"])
        text += (
            f" A coarse-level cache miss (a solve) costs at most {miss:.2f} ms; the fine "
            "ranking is one small matrix product."
        )
        out.append(text)
    return out


def compare(http: dict, key: str, tokens: int, long_tokens: int | None) -> list[Row]:
    """The rows of target `key` (routed, or the baseline router) against direct."""
    short, streamed = http["short"], http["stream"]
    rows = [
        Row.of(
            f"non-streaming total ({tokens} tokens)",
            [c.ms for c in short["direct"]],
            [c.ms for c in short[key]],
        ),
        Row.of(
            "streaming TTFT",
            [c.ttft_ms for c in streamed["direct"]],
            [c.ttft_ms for c in streamed[key]],
        ),
        Row.of(
            f"streaming total ({tokens} tokens)",
            [c.total_ms for c in streamed["direct"]],
            [c.total_ms for c in streamed[key]],
        ),
    ]
    if "long" in http:
        rows.append(
            Row.of(
                f"non-streaming, {long_tokens} tokens",
                [c.ms for c in http["long"]["direct"]],
                [c.ms for c in http["long"][key]],
            )
        )
    return rows


def cpu_means(sample: dict[str, list]) -> dict[str, float]:
    return {
        k.removeprefix("cpu_"): statistics.fmean(v)
        for k, v in sample.items()
        if k.startswith("cpu_")
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100, help="non-streaming requests per target")
    p.add_argument("--stream-requests", type=int, default=None, help="default: requests / 2")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=32, help="max_tokens of the longer requests")
    p.add_argument(
        "--long-requests", type=int, default=None, help="default: requests / 4; 0 skips them"
    )
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--feature-repeats", type=int, default=20)
    p.add_argument("--no-auto", action="store_true", help="skip the in-process auto-path part")
    p.add_argument(
        "--baseline",
        default=BASELINE_REF,
        help="git ref of the 'before' router, run in the same interleaving ('none': skip)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    n_stream = a.stream_requests if a.stream_requests is not None else max(1, a.requests // 2)
    n_long = a.long_requests if a.long_requests is not None else max(1, a.requests // 4)
    body = {"model": MODEL, "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0}
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="router_overhead_") as tmp:
        baseline = None
        if a.baseline.lower() != "none":
            baseline = extract_baseline(a.baseline, Path(tmp) / "baseline")
        procs, urls = start_services(Path(tmp), baseline)
        try:
            print(f"services up in {time.perf_counter() - start:.1f} s", flush=True)
            pids = {proc.name: proc.proc.pid for proc in procs}
            http = measure_http(
                urls,
                body,
                pids,
                n=a.requests,
                n_stream=n_stream,
                long_tokens=a.long_tokens,
                n_long=n_long,
            )
        except BaseException:
            for proc in procs:
                tail = proc.log_path.read_text()[-2000:] if proc.log_path.exists() else ""
                print(f"--- {proc.name} log tail ---\n{tail}", flush=True)
            raise
        finally:
            stop_all(procs)
    print(f"HTTP part done in {time.perf_counter() - start:.1f} s", flush=True)

    short, streamed = http["short"], http["stream"]
    reference = http["reference"]
    tokens = reference.completion_tokens
    long_tokens = http["long_reference"].completion_tokens if "long" in http else None
    rows = compare(http, "routed", tokens, long_tokens)
    before = compare(http, "before", tokens, long_tokens) if "before" in short else None
    cpu = {f"{tokens} tokens": cpu_means(short)}
    if "long" in http:
        cpu[f"{long_tokens} tokens"] = cpu_means(http["long"])
    gaps = [
        c.ms - float(c.headers["x-tandem-latency-ms"])
        for c in short["routed"]
        if "x-tandem-latency-ms" in c.headers
    ]
    auto = None if a.no_auto else measure_auto(a.prompt, a.max_tokens, a.feature_repeats)
    meta = {
        "machine": f"{cpu_name()}, Python {platform.python_version()}",
        "prompt": a.prompt,
        "max_tokens": a.max_tokens,
        "long_tokens": a.long_tokens,
        "text": reference.text,
        "completion_tokens": tokens,
        "long_completion_tokens": long_tokens,
        "headers": short["routed"][0].headers,
        "router_gap_ms": statistics.median(gaps) if gaps else None,
        "cpu_ms": cpu,
        "baseline": a.baseline if before is not None else None,
        "wall_s": time.perf_counter() - start,
    }
    meta["discussion"] = discussion(rows, meta, auto, before)
    md = render(rows, auto, meta, before)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "router_overhead.md").write_text(md)

    def samples(sample: dict[str, list], attr: str) -> dict[str, list[float]]:
        return {
            k: [getattr(c, attr) for c in v] if k in ("direct", "routed", "before") else v
            for k, v in sample.items()
        }

    (a.out / "router_overhead.json").write_text(
        json.dumps(
            {
                **meta,
                "config": {
                    "requests": a.requests,
                    "stream_requests": n_stream,
                    "long_requests": n_long,
                    "feature_repeats": a.feature_repeats,
                    "edge_threads": 1,
                },
                "rows": [r.as_dict() for r in rows],
                "rows_before": [r.as_dict() for r in before] if before is not None else None,
                "samples_ms": {
                    "short": samples(short, "ms"),
                    "short_router_reported": [
                        float(c.headers.get("x-tandem-latency-ms", "nan")) for c in short["routed"]
                    ],
                    "stream_ttft": samples(streamed, "ttft_ms"),
                    "stream_total": samples(streamed, "total_ms"),
                    "long": samples(http["long"], "ms") if "long" in http else None,
                },
                "auto": auto,
            },
            indent=1,
        )
    )
    print(md)
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
