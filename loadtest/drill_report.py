"""`make drills`: run every failure drill (real processes, real kills) and write the table of
what happened to docs/bench/drills.md: how many requests each drill sent, how many succeeded,
failed cleanly (an OpenAI-shaped error or a stream error event) or were lost (lost must be 0).

Each drill is a test that prints one line `<name> drill...: {counts}` (or `sent N, succeeded
N, ..., lost N`); this runs them with pytest and collects those lines."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench" / "drills.md"
DRILLS = [
    ("Kill an edge node during load (router fails over)", "tests/drills/test_edge_kill.py"),
    (
        "Kill cloud_ctx (the session continues after restart, from Redis)",
        "tests/services/edge_node/test_collab_cloud_restart.py",
    ),
    (
        "Kill an attention worker (the KV is rebuilt)",
        "tests/services/cloud_ctx/test_offload.py::"
        "test_real_model_greedy_identical_and_worker_kill_recomputes_from_the_log",
    ),
    ("Restart Redis with AOF (no session lost)", "tests/drills/test_redis_restart.py"),
    ("Cut the edge-cloud link (standalone, and says so)", "tests/drills/test_link_cut.py"),
    (
        "Client disconnects through the router (cancellation)",
        "tests/drills/test_cancel_through_router.py",
    ),
]
KEYS = ("sent", "succeeded", "failed_cleanly", "lost")


def counts(text: str) -> dict[str, int]:
    out = {}
    for key in KEYS:
        m = re.search(rf"'?{key}'?[:,]?\s*:?\s*(\d+)", text)
        if m:
            out[key] = int(m.group(1))
    return out


def main() -> int:
    rows, failed = [], 0
    for title, target in DRILLS:
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", target],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - t0
        line = next((ln for ln in run.stdout.splitlines() if "drill" in ln and ":" in ln), "")
        c = counts(line.split(":", 1)[1]) if line else {}
        ok = run.returncode == 0
        failed += not ok
        rows.append((title, "pass" if ok else "FAIL", c, seconds, target))
        print(f"{'pass' if ok else 'FAIL'} {title}: {c} ({seconds:.0f} s)", flush=True)
    lines = [
        "# Failure drills",
        "",
        "`make drills` (`python -m loadtest.drill_report`): every drill runs real processes and",
        "real kills on loopback; each is also a test in `make test`. Counts are requests (or",
        "tokens, where the drill is one long generation) the drill sent, and how each ended:",
        "succeeded, failed cleanly (an OpenAI-shaped error or a stream error event, never a",
        "hang) or lost. Lost must be 0.",
        "",
        "| drill | result | sent | succeeded | failed cleanly | lost | time | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for title, result, c, seconds, target in rows:
        cells = [str(c.get(k, "—")) for k in KEYS]
        if c and "failed_cleanly" not in c:
            cells[2] = "0"
        lines.append(f"| {title} | {result} | {' | '.join(cells)} | {seconds:.0f} s | `{target}` |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
