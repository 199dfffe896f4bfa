#!/usr/bin/env bash
# Validate the docker-compose deployment offline (no Docker engine needed):
#   1. `docker-compose config -q` on deploy/docker/docker-compose.yml, without and with
#      deploy/docker/.env.example (schema, interpolation, depends_on conditions, anchors);
#   2. deploy/docker/check_config.py: healthchecks, argparse flags of every command, ports,
#      router.yaml replicas, Prometheus jobs/targets, and every metric in the Grafana dashboard
#      against the names the services' metrics classes export;
#   3. `sh -n` on the image entry point.
# docker-compose: an existing `docker-compose` (or $TANDEM_COMPOSE), else Debian's package
# (`apt-get install docker-compose`, v1.29.2 on bookworm; root or sudo), else PyPI's
# docker-compose==1.29.2 in .venv-compose/. Exit 0: valid; 1: invalid; 2: no docker-compose.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DIR=deploy/docker
export DEBIAN_FRONTEND=noninteractive

log() { printf '[validate_compose] %s\n' "$*" >&2; }

find_compose() {
    if [[ -n "${TANDEM_COMPOSE:-}" ]]; then echo "$TANDEM_COMPOSE"; return 0; fi
    if command -v docker-compose >/dev/null 2>&1; then echo docker-compose; return 0; fi
    if [[ -x "$ROOT/.venv-compose/bin/docker-compose" ]]; then
        echo "$ROOT/.venv-compose/bin/docker-compose"; return 0
    fi
    return 1
}

install_compose() {
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(); fi
    fi
    if command -v apt-get >/dev/null 2>&1 && { [[ $EUID -eq 0 ]] || ((${#sudo[@]})); }; then
        log "installing Debian's docker-compose"
        if "${sudo[@]}" apt-get install -y --no-install-recommends docker-compose >&2 \
            || { "${sudo[@]}" apt-get update >&2 \
                 && "${sudo[@]}" apt-get install -y --no-install-recommends docker-compose >&2; }; then
            return 0
        fi
        log "apt-get could not install docker-compose"
    fi
    # Fallback (untested here): PyPI's docker-compose 1.29.2 in its own venv (it pins
    # PyYAML<6, which may need a source build on Python >= 3.11).
    log "trying PyPI docker-compose==1.29.2 in .venv-compose/"
    python3 -m venv "$ROOT/.venv-compose" >&2 \
        && "$ROOT/.venv-compose/bin/python" -m pip install -q docker-compose==1.29.2 >&2
}

COMPOSE="$(find_compose)" || { install_compose || true; COMPOSE="$(find_compose)"; } || {
    log "docker-compose is not available and could not be installed"
    exit 2
}
log "using $COMPOSE ($($COMPOSE version --short 2>/dev/null || $COMPOSE version 2>/dev/null | head -1))"

status=0
run() { log "$*"; "$@" || { log "FAILED: $*"; status=1; }; }

# Without an .env file the defaults apply (${VAR:-default}); a local deploy/docker/.env, if
# present, is read by compose either way.
run $COMPOSE -f "$DIR/docker-compose.yml" config -q
run $COMPOSE -f "$DIR/docker-compose.yml" --env-file "$DIR/.env.example" config -q
run sh -n "$DIR/entrypoint.sh"
if [[ -x "$PY" ]]; then
    run "$PY" "$DIR/check_config.py"
else
    log "FAILED: $PY not found (run make setup): the dashboard/metrics checks need the project venv"
    status=1
fi
((status == 0)) && log "ok" || log "invalid"
exit "$status"
