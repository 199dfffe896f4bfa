#!/usr/bin/env bash
# A local Redis for tests and `make run-cloud`: Debian's redis-server, daemonized, loopback only.
#
#   bash scripts/redis.sh start   # idempotent: does nothing when the port already answers PING
#   bash scripts/redis.sh stop    # SHUTDOWN (the append-only file is flushed first)
#   bash scripts/redis.sh url     # prints redis://127.0.0.1:<port>/0
#
# Port: REDIS_PORT (default 6390, away from a system Redis on 6379). Data (appendonly yes, no RDB
# snapshots), pid and log file live in the git-ignored .run/redis/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${REDIS_PORT:-6390}"
DIR="$ROOT/.run/redis"
CLI=(redis-cli -h 127.0.0.1 -p "$PORT")

answers() { [[ "$("${CLI[@]}" ping 2>/dev/null || true)" == "PONG" ]]; }

case "${1:-}" in
start)
    if answers; then
        echo "redis: already running on 127.0.0.1:$PORT" >&2
        exit 0
    fi
    command -v redis-server >/dev/null || { echo "redis: redis-server not found (make setup)" >&2; exit 1; }
    mkdir -p "$DIR"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --dir "$DIR" \
        --appendonly yes --save "" \
        --pidfile "$DIR/redis-$PORT.pid" --logfile "$DIR/redis-$PORT.log"
    for _ in $(seq 100); do
        if answers; then
            echo "redis: started on 127.0.0.1:$PORT (data in $DIR)" >&2
            exit 0
        fi
        sleep 0.1
    done
    echo "redis: did not answer on port $PORT; see $DIR/redis-$PORT.log" >&2
    exit 1
    ;;
stop)
    if answers; then
        "${CLI[@]}" shutdown >/dev/null 2>&1 || true
        echo "redis: stopped 127.0.0.1:$PORT" >&2
    else
        echo "redis: not running on 127.0.0.1:$PORT" >&2
    fi
    ;;
url)
    echo "redis://127.0.0.1:$PORT/0"
    ;;
*)
    echo "usage: $0 start|stop|url" >&2
    exit 2
    ;;
esac
