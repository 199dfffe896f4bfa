#!/usr/bin/env bash
# The CE-CoLLM pair on loopback (run by `make run-collab`): Redis, the cloud context manager
# (layers [split, L)) and an edge node (layers [0, split) + exit heads) that asks the cloud
# for the tokens it is not confident about. Ctrl-C stops both.
#   TANDEM_MODEL (default qwen15), TANDEM_SPLIT (default: the middle exit layer),
#   TANDEM_TAU (default 0.8), PORT (edge HTTP, 8000), CLOUD_GRPC_PORT (50061).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
MODEL="${TANDEM_MODEL:-qwen15}"
SPLIT="${TANDEM_SPLIT:-$($PY -c "
from tandem.models.registry import ModelRegistry
e = ModelRegistry().get('$MODEL').exit_layers
print(e[len(e) // 2])")}"
CLOUD_PORT="${CLOUD_GRPC_PORT:-50061}"
METRICS_PORT="${CLOUD_METRICS_PORT:-9461}"
export TANDEM_REDIS_URL="${TANDEM_REDIS_URL:-$(bash scripts/redis.sh url)}"

$PY -m services.cloud_ctx.main --model "$MODEL" --split "$SPLIT" \
    --grpc-port "$CLOUD_PORT" --metrics-port "$METRICS_PORT" &
cloud=$!
trap 'kill "$cloud" 2>/dev/null || true; wait "$cloud" 2>/dev/null || true' EXIT INT TERM

healthy() {
    $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$METRICS_PORT/health', timeout=2)" \
        >/dev/null 2>&1
}
for _ in $(seq 300); do  # the cloud loads its half of the model first (bounded: 5 min)
    healthy && break
    kill -0 "$cloud" 2>/dev/null || { echo "cloud_ctx exited" >&2; exit 1; }
    sleep 1
done
healthy || { echo "cloud_ctx not healthy after 5 min" >&2; exit 1; }

$PY -m services.edge_node.main --model "$MODEL" --split "$SPLIT" \
    --tau "${TANDEM_TAU:-0.8}" --collab "${TANDEM_COLLAB:-speculative}" \
    --cloud "127.0.0.1:$CLOUD_PORT"
