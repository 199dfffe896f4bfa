#!/usr/bin/env bash
# `make loadtest`: a bounded, headless locust load test of the router's streaming chat API,
# on loopback, reported with vLLM's serving metrics (TTFT, TPOT, ITL, E2E, goodput).
#
# 1. Sets up .venv-locust (locust pinned below, its own virtualenv: the project's .venv never
#    gets locust, and the project's code never imports it). A stamp file makes reruns instant.
# 2. If nothing answers on $LOADTEST_HOST/ready, starts the small cluster of
#    configs/loadtest_cluster.yaml (one smollm2 edge node + the router, ports 18xxx) in the
#    background, waits for "cluster ready", and always stops it on exit (SIGTERM, then KILL).
# 3. Phase "steady": locust --headless, LOADTEST_USERS users for LOADTEST_RUN_TIME.
#    Phase "overload": LOADTEST_OVERLOAD_USERS users (more than the edge node's max_batch of 8)
#    for LOADTEST_OVERLOAD_RUN_TIME; 0 skips it. In-flight requests finish (--stop-timeout) and
#    every locust run is wrapped in `timeout`, so the whole test is bounded.
# 4. `.venv/bin/python -m loadtest.report` writes docs/bench/loadtest.{md,csv,png} and
#    docs/bench/loadtest_requests.csv. Raw files (per-request CSVs, locust's --csv files,
#    cluster logs) stay in .run/loadtest/.
#
# Settings (environment): LOADTEST_HOST (default http://127.0.0.1:18180), LOADTEST_USERS (4),
# LOADTEST_SPAWN_RATE (users/s, default = users), LOADTEST_RUN_TIME (60s),
# LOADTEST_OVERLOAD_USERS (12), LOADTEST_OVERLOAD_RUN_TIME (30s), LOADTEST_MODEL (smollm2),
# LOADTEST_MAX_TOKENS (64), LOADTEST_PROMPTS, LOADTEST_TIMEOUT_S (120),
# LOADTEST_SLO_TTFT_MS (2000), LOADTEST_SLO_TPOT_MS (200), LOADTEST_SLO_E2E_MS (unset),
# LOADTEST_CLUSTER_CONFIG (configs/loadtest_cluster.yaml), LOADTEST_OUT (docs/bench).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOCUST_SPEC="locust==2.47.0"
VENV="$ROOT/.venv-locust"
PY="$ROOT/.venv/bin/python"
RUN="$ROOT/.run/loadtest"

HOST="${LOADTEST_HOST:-http://127.0.0.1:18180}"
USERS="${LOADTEST_USERS:-4}"
SPAWN_RATE="${LOADTEST_SPAWN_RATE:-$USERS}"
RUN_TIME="${LOADTEST_RUN_TIME:-60s}"
OVERLOAD_USERS="${LOADTEST_OVERLOAD_USERS:-12}"
OVERLOAD_RUN_TIME="${LOADTEST_OVERLOAD_RUN_TIME:-30s}"
CLUSTER_CONFIG="${LOADTEST_CLUSTER_CONFIG:-configs/loadtest_cluster.yaml}"
OUT="${LOADTEST_OUT:-docs/bench}"
STOP_TIMEOUT=60
export LOADTEST_MODEL="${LOADTEST_MODEL:-smollm2}"
export LOADTEST_MAX_TOKENS="${LOADTEST_MAX_TOKENS:-64}"
export LOADTEST_TIMEOUT_S="${LOADTEST_TIMEOUT_S:-120}"

log() { printf '[loadtest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
seconds() {  # locust run time (30s, 2m, 1h30m, 45) -> seconds
    "$PY" -c 'import re,sys; t=sys.argv[1]; p=re.findall(r"(\d+)([hms]?)", t)
print(sum(int(n)*{"h":3600,"m":60,"s":1,"":1}[u] for n,u in p))' "$1"
}

[[ -x "$PY" ]] || die "no project venv at .venv (run make setup first)"
START_S=$(date +%s)
mkdir -p "$RUN"

# -- 1. locust in its own virtualenv ---------------------------------------------------------
STAMP="$VENV/.stamp-$(printf '%s' "$LOCUST_SPEC" | sha1sum | cut -c1-12)"
if [[ ! -f "$STAMP" ]]; then
    PYTHON="${PYTHON:-python3}"
    log "creating .venv-locust ($LOCUST_SPEC, $("$PYTHON" -V 2>&1))"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -qq "$LOCUST_SPEC"  # -qq: errors only
    touch "$STAMP"
fi
LOCUST_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("locust"))')"

# -- 2. a cluster to test --------------------------------------------------------------------
CLUSTER_PID=""
stop_cluster() {
    [[ -n "$CLUSTER_PID" ]] || return 0
    if kill -0 "$CLUSTER_PID" 2>/dev/null; then
        log "stopping the cluster (pid $CLUSTER_PID)"
        kill -TERM "$CLUSTER_PID" 2>/dev/null || true
        for _ in $(seq 1 120); do kill -0 "$CLUSTER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$CLUSTER_PID" 2>/dev/null || true
    fi
    wait "$CLUSTER_PID" 2>/dev/null || true
    CLUSTER_PID=""
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

if curl -sf -m 3 "$HOST/ready" >/dev/null 2>&1; then
    CLUSTER_NOTE="an already running router"
    log "using the router already answering at $HOST"
else
    log "nothing ready at $HOST: starting $CLUSTER_CONFIG (log $RUN/cluster.log)"
    "$PY" -m tandem.cluster --config "$CLUSTER_CONFIG" --no-demo --log-dir "$RUN/logs" \
        >"$RUN/cluster.log" 2>&1 &
    CLUSTER_PID=$!
    deadline=$(( $(date +%s) + 600 ))
    until grep -q '^cluster ready' "$RUN/cluster.log"; do
        kill -0 "$CLUSTER_PID" 2>/dev/null || { cat "$RUN/cluster.log" >&2; die "the cluster exited"; }
        (( $(date +%s) < deadline )) || { cat "$RUN/cluster.log" >&2; die "cluster not ready in 600 s"; }
        sleep 1
    done
    curl -sf -m 5 "$HOST/ready" >/dev/null || die "cluster ready, but nothing answers at $HOST/ready"
    CLUSTER_NOTE="the small cluster of $CLUSTER_CONFIG, started for this run: one smollm2 edge node behind the router"
    log "cluster ready"
fi

# -- 3. locust phases ------------------------------------------------------------------------
PHASES=()
run_phase() {  # name users spawn_rate run_time
    local name=$1 users=$2 rate=$3 run_time=$4
    local bound=$(( $(seconds "$run_time") + STOP_TIMEOUT + 60 ))
    log "phase $name: $users users for $run_time (hard bound ${bound} s)"
    rm -f "$RUN/$name".csv "$RUN/${name}_locust"_*.csv
    LOADTEST_PHASE="$name" LOADTEST_RECORDS="$RUN/$name.csv" \
        timeout -s TERM -k 30 "$bound" "$VENV/bin/locust" -f loadtest/locustfile.py --headless \
        -u "$users" -r "$rate" --run-time "$run_time" --stop-timeout "$STOP_TIMEOUT" \
        --host "$HOST" --csv "$RUN/${name}_locust" --only-summary --exit-code-on-error 0 \
        >"$RUN/${name}_locust.log" 2>&1 || log "locust $name exited $? (log $RUN/${name}_locust.log)"
    tail -n 12 "$RUN/${name}_locust.log" >&2
    PHASES+=("$name:$users:$rate:$run_time")
}
run_phase steady "$USERS" "$SPAWN_RATE" "$RUN_TIME"
if (( OVERLOAD_USERS > 0 )); then
    run_phase overload "$OVERLOAD_USERS" "$OVERLOAD_USERS" "$OVERLOAD_RUN_TIME"
fi
stop_cluster

# -- 4. report -------------------------------------------------------------------------------
WALL_S=$(( $(date +%s) - START_S ))
"$PY" - "$RUN/run.json" "$HOST" "$CLUSTER_NOTE" "$LOCUST_VERSION" "$WALL_S" "$RUN" "${PHASES[@]}" <<'EOF'
import json, os, sys
out, host, cluster, version, wall, run, *phases = sys.argv[1:]
meta = {
    "host": host, "cluster": cluster, "locust": version, "wall_s": int(wall),
    "model": os.environ["LOADTEST_MODEL"], "max_tokens": int(os.environ["LOADTEST_MAX_TOKENS"]),
    "timeout_s": float(os.environ["LOADTEST_TIMEOUT_S"]),
    "phases": [
        {"name": n, "users": int(u), "spawn_rate": float(r), "run_time": t,
         "records": f"{run}/{n}.csv", "locust": f"{run}/{n}_locust"}
        for n, u, r, t in (p.split(":") for p in phases)
    ],
}
open(out, "w").write(json.dumps(meta, indent=2))
EOF
SLO_ARGS=(--slo-ttft-ms "${LOADTEST_SLO_TTFT_MS:-2000}" --slo-tpot-ms "${LOADTEST_SLO_TPOT_MS:-200}")
[[ -n "${LOADTEST_SLO_E2E_MS:-}" ]] && SLO_ARGS+=(--slo-e2e-ms "$LOADTEST_SLO_E2E_MS")
"$PY" -m loadtest.report --meta "$RUN/run.json" --out "$OUT" "${SLO_ARGS[@]}"
log "done in $(( $(date +%s) - START_S )) s"
