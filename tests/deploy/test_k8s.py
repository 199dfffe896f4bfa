"""deploy/k8s: every kustomization builds and passes `kubernetes-validate --strict`
(scripts/validate_k8s.sh), and the built manifests keep the deployment's invariants."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_k8s.sh"
K8S = ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/jetson", "overlays/gpu", "overlays/cluster"]
WORKLOADS = ("Deployment", "StatefulSet")


@pytest.fixture(scope="module")
def kubectl() -> str:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-kubectl"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(kubectl) -> dict[str, list[dict]]:
    docs = {}
    for t in TARGETS:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / t)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"{t}: {out.stderr}"
        docs[t] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return docs


def _get(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind}/{name}"
    return found[0]


def _pod(doc) -> dict:
    return doc["spec"]["template"]["spec"]


def _edges(docs):
    return [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "edge"
    ]


def test_validate_script_passes_every_overlay(kubectl):
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for t in TARGETS:
        assert f"ok   {t}:" in out.stdout


def test_validate_script_rejects_an_unknown_field(kubectl, tmp_path):
    (tmp_path / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {ports: [{port: 80}], bogusField: 1}\n"
    )
    (tmp_path / "kustomization.yaml").write_text("resources: [svc.yaml]\n")
    out = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "bogusField" in out.stdout + out.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_resources_and_probes(built, target):
    workloads = [d for d in built[target] if d["kind"] in WORKLOADS]
    assert workloads
    for w in workloads:
        for c in _pod(w)["containers"]:
            where = f"{target}: {w['kind']}/{w['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), where
            assert {"cpu", "memory"} <= set(res.get("limits", {})), where
            assert "readinessProbe" in c and "livenessProbe" in c, where


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_are_referenced_not_inlined(built, target):
    docs = built[target]
    secret = _get(docs, "Secret", "tandem-secrets")
    assert set(secret["stringData"]) == {"api-key", "grpc-token"}
    refs = set()
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        for c in _pod(w)["containers"]:
            for e in c.get("env", []):
                if e["name"] in ("TANDEM_API_KEY", "TANDEM_GRPC_TOKEN"):
                    assert "value" not in e, f"{w['metadata']['name']}: {e['name']} inlined"
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "tandem-secrets"
                    refs.add((w["metadata"]["name"], ref["key"]))
    for name in ("router", "edge-smollm2", "cloud-ctx", "attention-pool"):
        assert (name, "grpc-token") in refs
    assert ("router", "api-key") in refs


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_default_deny_and_allows(built, target):
    pols = {d["metadata"]["name"]: d for d in built[target] if d["kind"] == "NetworkPolicy"}
    deny = pols["default-deny-ingress"]["spec"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    )
    for name in (
        "allow-clients-to-router",
        "allow-router-to-edge",
        "allow-collaborative-edge-to-cloud-ctx",
        "allow-cloud-ctx-to-redis",
        "allow-cloud-ctx-to-attention-pool",
        "allow-prometheus-scrape",
    ):
        assert name in pols
    if target in ("overlays/gpu", "overlays/cluster"):
        assert "allow-router-to-vllm" in pols


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_pdb_and_redis(built, target):
    docs = built[target]
    hpas = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }
    assert {"router", "edge-smollm2", "edge-gemma3", "edge-qwen05"} <= hpas
    pdbs = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert {"router", "edge-smollm2", "cloud-ctx", "redis"} <= pdbs
    redis = _get(docs, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"]
    assert "--appendonly" in _pod(redis)["containers"][0]["args"]
    pool = _get(docs, "StatefulSet", "attention-pool")
    assert pool["spec"]["replicas"] == 2
    env = {
        e["name"]: e.get("value")
        for e in _pod(_get(docs, "Deployment", "cloud-ctx"))["containers"][0]["env"]
    }
    assert env["TANDEM_ATTENTION_POOL"].count("attention-pool-") == 2
    assert env["TANDEM_REDIS_URL"].startswith("redis://redis:6379")


@pytest.mark.parametrize("target", ["overlays/jetson", "overlays/cluster"])
def test_jetson_edge_pods(built, target):
    edges = _edges(built[target])
    assert len(edges) == 4
    for d in edges:
        pod = _pod(d)
        assert pod["nodeSelector"]["kubernetes.io/arch"] == "arm64"
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["tolerations"]
        assert pod["containers"][0]["image"].startswith("tandem/tandem-jetson:")


def test_base_edge_pods_stay_generic(built):
    for d in _edges(built["base"]):
        pod = _pod(d)
        assert "runtimeClassName" not in pod and "nodeSelector" not in pod


@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/cluster"])
def test_gpu_overlay_requests_gpus(built, target):
    docs = built[target]
    for kind, name in (
        ("Deployment", "cloud-ctx"),
        ("StatefulSet", "attention-pool"),
        ("Deployment", "vllm"),
    ):
        c = _pod(_get(docs, kind, name))["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1, name
    vllm = _pod(_get(docs, "Deployment", "vllm"))["containers"][0]
    assert vllm["image"].startswith("vllm/vllm-openai:") and "latest" not in vllm["image"]
    assert "--served-model-name=qwen15-vllm" in vllm["args"]


@pytest.mark.parametrize("target", TARGETS)
def test_router_config_parses_and_is_mounted(built, target):
    from services.router.config import parse_router_config

    docs = built[target]
    cms = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("router-config-")
    ]
    assert len(cms) == 1
    cfg = parse_router_config(yaml.safe_load(cms[0]["data"]["router.yaml"]), {}, ROOT)
    ids = {e.expert_id for e in cfg.experts}
    assert {"smollm2", "gemma3", "qwen05", "qwen15"} <= ids
    assert ("qwen15-vllm" in ids) == (target in ("overlays/gpu", "overlays/cluster"))
    router = _pod(_get(docs, "Deployment", "router"))
    assert router["volumes"][0]["configMap"]["name"] == cms[0]["metadata"]["name"]
