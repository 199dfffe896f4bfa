"""Turn a load test's per-request records into vLLM-style serving metrics (`make loadtest`).

    python -m loadtest.report --meta .run/loadtest/run.json --out docs/bench

`--meta` is the JSON scripts/loadtest.sh writes: the run's settings and, per phase (e.g. a
steady load, then more users than the cluster can serve), the per-request CSV that
loadtest/locustfile.py wrote and the prefix of locust's own --csv files. Writes
`loadtest.md` (summary), `loadtest.csv` (one row per phase and metric),
`loadtest_requests.csv` (every request) and `loadtest.png` (distributions and latency over
time). Definitions: loadtest/metrics.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.machine import cpu_name
from loadtest.metrics import PERCENTILES, Dist, RequestRecord, Slo, Summary, summarize


@dataclass
class Phase:
    name: str
    meta: dict
    rows: list[dict]
    records: list[RequestRecord]
    summary: Summary
    locust: dict | None  # locust's own "chat" row of <prefix>_stats.csv


def _float(s: str) -> float | None:
    return float(s) if s not in ("", None) else None


def read_records(path: Path) -> tuple[list[dict], list[RequestRecord]]:
    """The locustfile's per-request CSV."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    records = [
        RequestRecord(
            start=float(r["start_unix"]),
            ok=r["ok"] == "1",
            status=int(r["status"] or 0),
            ttft_s=_float(r["ttft_s"]),
            e2e_s=_float(r["e2e_s"]),
            output_tokens=int(r["output_tokens"] or 0),
            itl_s=tuple(float(x) / 1e3 for x in r["itl_ms"].split()),
            error=r["error"],
        )
        for r in rows
    ]
    return rows, records


def locust_row(prefix: str | None, name: str = "chat") -> dict | None:
    if not prefix:
        return None
    path = Path(f"{prefix}_stats.csv")
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return next((r for r in csv.DictReader(f) if r.get("Name") == name), None)


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1f}"


def _rate(x: float) -> str:
    return f"{x:.3f}"


METRICS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


def summary_rows(phases: list[Phase]) -> list[dict]:
    out = []
    for p in phases:
        s = p.summary
        base = {
            "phase": p.name,
            "users": p.meta.get("users"),
            "duration_s": round(s.duration_s, 3),
            "sent": s.sent,
            "completed": s.completed,
            "failed": s.failed,
            "request_throughput": round(s.request_throughput, 4),
            "output_throughput": round(s.output_throughput, 3),
            "goodput": round(s.goodput, 4),
            "slo": s.slo.describe(),
        }
        for label, attr in METRICS:
            d: Dist = getattr(s, attr)
            row = {**base, "metric": label, "n": d.n, "mean_ms": round(d.mean, 3)}
            row["std_ms"] = round(d.std, 3)
            row.update({f"p{q}_ms": round(v, 3) for q, v in d.pct.items()})
            out.append(row)
    return out


def write_csvs(phases: list[Phase], out: Path) -> None:
    rows = summary_rows(phases)
    with (out / "loadtest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    columns = next((list(p.rows[0]) for p in phases if p.rows), [])
    fields = ["phase", *[k for k in columns if k != "phase"]]
    with (out / "loadtest_requests.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for p in phases:
            for r in p.rows:
                w.writerow({**r, "phase": p.name})


def plot(phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    cdfs = (
        (axes[0][0], "TTFT (ms)", lambda rs: [r.ttft_s for r in rs if r.ok]),
        (axes[0][1], "ITL (ms)", lambda rs: [g for r in rs if r.ok for g in r.itl_s]),
        (axes[1][0], "E2E latency (ms)", lambda rs: [r.e2e_s for r in rs if r.ok]),
    )
    for ax, label, values in cdfs:
        for p in phases:
            xs = sorted(v * 1e3 for v in values(p.records))
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{p.name} ({p.meta.get('users')} users)")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests" if "ITL" not in label else "fraction of gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][1]
    t0 = min((r.start for p in phases for r in p.records), default=0.0)
    for p in phases:
        ok = [r for r in p.records if r.ok]
        bad = [r for r in p.records if not r.ok]
        ax.scatter([r.start - t0 for r in ok], [r.e2e_s * 1e3 for r in ok], s=10, label=p.name)
        if bad:
            ax.scatter(
                [r.start - t0 for r in bad],
                [(r.e2e_s or 0.0) * 1e3 for r in bad],
                s=18,
                marker="x",
                label=f"{p.name}: failed",
            )
    ax.set_xlabel("request sent at (s since the first)")
    ax.set_ylabel("E2E latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Tandem router, streaming chat under locust load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(phases: list[Phase], meta: dict) -> str:
    slo = phases[0].summary.slo
    lines = [
        "# Load test: streaming chat through the router (locust)",
        "",
        f"Machine: {cpu_name()}, Python {platform.python_version()}. Generated by `make loadtest`"
        f" (scripts/loadtest.sh; locust {meta.get('locust', '?')} in its own .venv-locust,"
        f" wall time {meta.get('wall_s', '?')} s); every number below is from that one run.",
        "",
        f"Target: {meta.get('host')} ({meta.get('cluster', 'an already running router')})."
        f" Request: `/v1/chat/completions`, `model: {meta.get('model')}`, `stream: true` with"
        f" `stream_options.include_usage`, max_tokens {meta.get('max_tokens')}, one of"
        " loadtest/locustfile.py's built-in prompts (or LOADTEST_PROMPTS). Each locust user"
        " sends its next request as soon as the last one ended (closed loop, like `vllm bench"
        " serve --max-concurrency <users>`); requests still in flight when the run time ends"
        " are finished (locust --stop-timeout) and counted.",
        "",
        "Definitions (vLLM's serving benchmark; loadtest/metrics.py): **TTFT** = first content"
        " chunk − request sent; **ITL** = gaps between consecutive content chunks, pooled over"
        " requests; **TPOT** = (E2E − TTFT) / (output tokens − 1) per request with ≥ 2 tokens"
        " (output tokens from the stream's usage chunk); **E2E** = last data chunk − request"
        " sent; throughputs and **goodput** divide by the phase's duration (first request sent"
        f" to last finished). Goodput SLO: {slo.describe()} (MLPerf's Llama-2-70B server"
        " targets; set with LOADTEST_SLO_TTFT_MS / _TPOT_MS / _E2E_MS). A request counts as"
        " completed only with HTTP 200, content, no error event and `[DONE]`; everything"
        " else (429s included) is a failure and never counts toward goodput; after a 429 the"
        " user waits its Retry-After (at most 5 s) before the next request. The overload phase"
        " runs more users than the cluster serves at once (configs/loadtest_cluster.yaml: the"
        " edge node batches 8, the router admits 8 streams in flight): the extra requests are"
        " refused at once with 429, or, without an admission limit, wait in the edge node's"
        " queue and show as TTFT.",
        "",
        "| phase | users | run time | duration (s) | sent | completed | failed | outcomes |"
        " req/s | output tok/s | goodput (req/s) | within SLO |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in phases:
        s = p.summary
        outcomes = ", ".join(f"{k}: {v}" for k, v in s.statuses.items())
        share = f"{100 * s.good / s.completed:.0f}%" if s.completed else "–"
        lines.append(
            f"| {p.name} | {p.meta.get('users')} | {p.meta.get('run_time', '?')}"
            f" | {s.duration_s:.1f} | {s.sent} | {s.completed}"
            f" | {s.failed} | {outcomes} | {_rate(s.request_throughput)}"
            f" | {s.output_throughput:.1f} | {_rate(s.goodput)} | {share} |"
        )
    pct_head = " | ".join(f"p{q}" for q in PERCENTILES)
    lines += [
        "",
        f"| phase | metric (ms) | n | mean | std | {pct_head} |",
        "|---|---|---:|---:|---:|" + "---:|" * len(PERCENTILES),
    ]
    for p in phases:
        for label, attr in METRICS:
            d: Dist = getattr(p.summary, attr)
            pct = " | ".join(_ms(d.pct[q]) for q in PERCENTILES)
            lines.append(f"| {p.name} | {label} | {d.n} | {_ms(d.mean)} | {_ms(d.std)} | {pct} |")
    lines += ["", "How long the slowest request took (a hang would show as a timeout):", ""]
    for p in phases:
        longest = max((r.e2e_s or 0.0 for r in p.records), default=0.0)
        lines.append(
            f"- {p.name}: {p.summary.failed} of {p.summary.sent} failed; the longest request took"
            f" {longest:.1f} s (client read timeout {meta.get('timeout_s', '?')} s)."
        )
    lines += ["", "Locust's own statistics of the same requests (its `chat` entry, E2E in ms):", ""]
    for p in phases:
        r = p.locust
        if r:
            lines.append(
                f"- {p.name}: {r['Request Count']} requests, {r['Failure Count']} failures,"
                f" median {r['Median Response Time']}, p99 {r.get('99%', '?')}"
                " (locust rounds its percentiles, and its count can miss a request that ended"
                " while it was stopping)."
            )
        else:
            lines.append(f"- {p.name}: no locust stats file.")
    lines += [
        "",
        "Few requests per phase: a p99 here is about the largest sample, read it as the tail's"
        " order of magnitude. The box's cores are shared by locust, the router and the edge"
        " node (and whatever else ran), so tails are noisy.",
        "",
        "Files: `loadtest.csv` (one row per phase and metric), `loadtest_requests.csv` (every"
        " request: send time, status, outcome, TTFT, E2E, tokens, inter-chunk gaps in ms),"
        " `loadtest.png` (CDFs of TTFT, ITL and E2E; E2E over time, failures marked ×).",
        "",
        "![load test](loadtest.png)",
        "",
    ]
    return "\n".join(lines)


def build(meta: dict, slo: Slo) -> list[Phase]:
    phases = []
    for ph in meta["phases"]:
        path = Path(ph["records"])
        if not path.exists():
            print(f"loadtest.report: no records for phase {ph['name']} ({path})", file=sys.stderr)
            continue
        rows, records = read_records(path)
        summary = summarize(records, slo)
        phases.append(Phase(ph["name"], ph, rows, records, summary, locust_row(ph.get("locust"))))
    return phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta", type=Path, default=Path(".run/loadtest/run.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--slo-ttft-ms", type=float, default=Slo.ttft_ms)
    ap.add_argument("--slo-tpot-ms", type=float, default=Slo.tpot_ms)
    ap.add_argument("--slo-e2e-ms", type=float, default=Slo.e2e_ms)
    a = ap.parse_args(argv)
    meta = json.loads(a.meta.read_text())
    slo = Slo(a.slo_ttft_ms, a.slo_tpot_ms, a.slo_e2e_ms)
    phases = build(meta, slo)
    if not phases or not any(p.records for p in phases):
        print("loadtest.report: no requests recorded", file=sys.stderr)
        return 1
    phases = [p for p in phases if p.records]
    a.out.mkdir(parents=True, exist_ok=True)
    write_csvs(phases, a.out)
    plot(phases, a.out / "loadtest.png")
    (a.out / "loadtest.md").write_text(markdown(phases, meta))
    for p in phases:
        s = p.summary
        print(
            f"{p.name}: {s.completed}/{s.sent} ok, {s.request_throughput:.3f} req/s,"
            f" goodput {s.goodput:.3f} req/s, TTFT p50 {_ms(s.ttft.pct[50])} ms,"
            f" TPOT p50 {_ms(s.tpot.pct[50])} ms, ITL p50 {_ms(s.itl.pct[50])} ms,"
            f" E2E p50 {_ms(s.e2e.pct[50])} ms"
        )
    print(f"wrote {a.out}/loadtest.md, loadtest.csv, loadtest_requests.csv, loadtest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
