#!/usr/bin/env bash
# Idempotent setup of .venv-llamacpp: llama-cpp-python==0.3.36 built from source in its own
# virtualenv, the llama.cpp side of `make bench-edge` (bench/llamacpp_side.py runs in it, so the
# project's .venv never imports llama_cpp and each side's RSS is its own process).
#
# GGML_NATIVE=OFF with the instruction sets named explicitly, AMX off. A -DGGML_NATIVE=ON build
# died with "Illegal instruction" on an Intel host with AMX. The build targets AVX/AVX2/FMA/
# F16C/BMI2, plus AVX-512 F/VNNI/BF16 where this CPU has all three (the AMD EPYC Zen 4 and
# Intel Sapphire Rapids hosts of this machine kind do; an AMD EPYC Zen 3 host has AVX2 only,
# and an AVX-512 build dies there). The chosen set is part of the stamp, so the venv is rebuilt
# on a host that needs another. AVX512-VBMI and AVX-VNNI (the VEX one) stay off. The mtmd
# (llava) library is not built (LLAVA_BUILD=OFF): the bench is text only and llama_cpp imports
# it lazily.
#
# The build takes ~13 min on 2 cores (CMAKE_BUILD_PARALLEL_LEVEL, default 2; run it under nice).
# A stamp file .venv-llamacpp/.stamp-<sha> (hash of this script and the Python version) makes a
# second run instant. Override the interpreter with PYTHON=/path/to/python3.11. Not part of
# `make test`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LLAMACPP_VENV:-$ROOT/.venv-llamacpp}"
SPEC="llama-cpp-python==0.3.36"

log() { printf '[llamacpp-venv] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON (run scripts/bootstrap.sh first)"
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || die "$PYTHON lacks venv/ensurepip (apt-get install -y python3-venv)"
for tool in cmake gcc g++; do
    command -v "$tool" >/dev/null 2>&1 || die "no $tool (apt-get install -y cmake build-essential)"
done

py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
avx512=OFF
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
if [[ " $cpu_flags " == *" avx512f "* && " $cpu_flags " == *" avx512_vnni "* \
      && " $cpu_flags " == *" avx512_bf16 "* ]]; then
    avx512=ON
fi
stamp_sha="$(cat scripts/llamacpp_venv.sh <(echo "$py_version avx512=$avx512") | sha256sum | cut -c1-16)"
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

CMAKE_FLAGS=(
    -DGGML_NATIVE=OFF
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX512=$avx512 -DGGML_AVX512_VNNI=$avx512 -DGGML_AVX512_BF16=$avx512
    -DGGML_AVX512_VBMI=OFF -DGGML_AVX_VNNI=OFF
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF
    -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF
    -DLLAVA_BUILD=OFF
)
export CMAKE_ARGS="${CMAKE_FLAGS[*]}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export FORCE_CMAKE=1

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
log "installing $SPEC from source (CMAKE_ARGS=$CMAKE_ARGS, $CMAKE_BUILD_PARALLEL_LEVEL jobs; ~13 min)"
"${PIP[@]}" install --no-cache-dir --no-binary llama-cpp-python "$SPEC"

"$VENV/bin/python" - <<'PY' || die "llama_cpp does not import (or is not the portable build)"
import sys

import llama_cpp

info = llama_cpp.llama_print_system_info().decode()
print(f"[llamacpp-venv] llama_cpp {llama_cpp.__version__}: {info.strip()}", file=sys.stderr)
sys.exit(0 if "AMX_INT8 = 1" not in info else 1)
PY

rm -f "$VENV"/.stamp-*
touch "$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1), $STAMP)"
