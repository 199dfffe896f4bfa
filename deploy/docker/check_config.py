"""Offline checks of the docker-compose deployment (no Docker engine needed).

    .venv/bin/python deploy/docker/check_config.py      # exit 1 and a list of problems

Checks that can fail, each against the code rather than a copied list:
- compose: every long-running service has a healthcheck; `depends_on` names real services;
  every `--flag` in a Tandem service's `command:` is an argparse flag of that service's main;
  health URLs use the ports the command sets; the edge's `--cloud` and cloud-ctx's
  `--attention-pool` point at the compose services and their gRPC ports.
- router.yaml: loads with the router's own parser; every replica is `<compose service>:<its
  --grpc-port>`.
- prometheus.yml: parses; the expected jobs exist; every target is a compose service on a port
  that serves /metrics there.
- grafana: the datasource and dashboard provider parse; dashboards/tandem.json parses, its
  panels use the provisioned datasource uid, and every metric name in a panel expression is
  one the services export (collected from the metrics classes themselves, with permissive
  fakes standing in for the engine, link, manager, store and selector they read at scrape time).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COMPOSE = HERE / "docker-compose.yml"
PROMETHEUS = HERE / "prometheus.yml"
ROUTER = HERE / "router.yaml"
DASHBOARD = HERE / "grafana" / "dashboards" / "tandem.json"
DATASOURCES = HERE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = HERE / "grafana" / "provisioning" / "dashboards" / "tandem.yml"

# entrypoint.sh's service aliases -> the main module's source file
MAINS = {
    "edge": "services/edge_node/main.py",
    "router": "services/router/main.py",
    "cloud-ctx": "services/cloud_ctx/main.py",
    "attention-pool": "services/attention_pool/main.py",
}
EXPECTED_JOBS = {"tandem-router", "tandem-edge", "tandem-cloud-ctx", "tandem-attention-pool"}
ONE_SHOT = {"model-init"}  # run to completion; others wait for service_completed_successfully
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
METRIC_RE = re.compile(r"\btandem_[a-zA-Z0-9_]+\b")
FLAG_RE = re.compile(r"add_argument\(\s*\"(--[a-z0-9][a-z0-9-]*)\"")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# -- compose -----------------------------------------------------------------------------------


def argparse_flags(main_file: Path) -> set[str]:
    """The `--flags` a service main declares (`add_argument("--x", ...)`)."""
    return set(FLAG_RE.findall(main_file.read_text()))


def _flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test", "")
    return " ".join(test) if isinstance(test, list) else str(test)


def service_ports(name: str, service: dict, router_cfg: dict | None = None) -> dict[str, list[int]]:
    """{'grpc': [...], 'metrics': [...]} of a Tandem service, from its command (the ports
    that /health and /metrics answer on are 'metrics')."""
    cmd = [str(c) for c in service.get("command") or []]
    kind = cmd[0] if cmd else ""
    if kind == "edge":
        return {
            "grpc": [int(_flag(cmd, "--grpc-port") or 50051)],
            "metrics": [int(_flag(cmd, "--port") or 8000)],
        }
    if kind == "cloud-ctx":
        return {
            "grpc": [int(_flag(cmd, "--grpc-port") or 50061)],
            "metrics": [int(_flag(cmd, "--metrics-port") or 9461)],
        }
    if kind == "attention-pool":
        n = int(_flag(cmd, "--workers") or 1)
        grpc, metrics = (
            int(_flag(cmd, "--port") or 50071),
            int(_flag(cmd, "--metrics-port") or 9471),
        )
        return {"grpc": [grpc + i for i in range(n)], "metrics": [metrics + i for i in range(n)]}
    if kind == "router":
        port = int((router_cfg or {}).get("port", 8080))
        return {"grpc": [], "metrics": [port]}
    return {"grpc": [], "metrics": []}


def check_compose(path: Path = COMPOSE, router_path: Path = ROUTER) -> list[str]:
    errors: list[str] = []
    doc = load_yaml(path)
    services: dict = doc.get("services") or {}
    router_cfg = load_yaml(router_path)
    if not services:
        return [f"{path.name}: no services"]
    for name, svc in services.items():
        where = f"{path.name}: service {name}"
        if name not in ONE_SHOT and not (svc.get("healthcheck") or {}).get("test"):
            errors.append(f"{where}: no healthcheck")
        deps = svc.get("depends_on") or {}
        for dep, spec in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            if dep not in services:
                errors.append(f"{where}: depends_on unknown service {dep!r}")
            cond = (spec or {}).get("condition", "service_started")
            if cond not in DEPENDS_CONDITIONS:
                errors.append(f"{where}: depends_on {dep}: unknown condition {cond!r}")
            if cond == "service_healthy" and not (services.get(dep) or {}).get("healthcheck"):
                errors.append(f"{where}: waits for {dep} to be healthy, which has no healthcheck")
        cmd = [str(c) for c in svc.get("command") or []]
        if not cmd or cmd[0] not in MAINS:
            continue
        flags = argparse_flags(ROOT / MAINS[cmd[0]])
        for arg in cmd[1:]:
            if arg.startswith("--") and arg.split("=", 1)[0] not in flags:
                errors.append(f"{where}: {arg.split('=', 1)[0]} is not a flag of {MAINS[cmd[0]]}")
        env = svc.get("environment") or {}
        host = _flag(cmd, "--host") or (env.get("HOST") if isinstance(env, dict) else None)
        if host != "0.0.0.0":
            errors.append(f"{where}: must bind 0.0.0.0 (HOST env or --host), got {host!r}")
        health = _healthcheck_text(svc)
        for port in service_ports(name, svc, router_cfg)["metrics"]:
            if str(port) not in health:
                errors.append(f"{where}: healthcheck does not probe its /health port {port}")
    errors += _check_targets(services, router_cfg, path.name)
    return errors


def _check_target(
    services: dict, router_cfg: dict, target: str, kind: str, where: str
) -> list[str]:
    host, _, port = target.rpartition(":")
    if host not in services:
        return [f"{where}: {target!r}: {host!r} is not a compose service"]
    ports = service_ports(host, services[host], router_cfg)[kind]
    if not port.isdigit() or int(port) not in ports:
        return [f"{where}: {target!r}: {host} serves {kind} on {ports}, not {port}"]
    return []


def _check_targets(services: dict, router_cfg: dict, fname: str) -> list[str]:
    errors = []
    for name, svc in services.items():
        cmd = [str(c) for c in svc.get("command") or []]
        where = f"{fname}: service {name}"
        cloud = _flag(cmd, "--cloud") if cmd and cmd[0] == "edge" else None
        if cloud:
            errors += _check_target(services, router_cfg, cloud, "grpc", where)
        pool = _flag(cmd, "--attention-pool") if cmd and cmd[0] == "cloud-ctx" else None
        for target in filter(None, (pool or "").split(",")):
            errors += _check_target(services, router_cfg, target.strip(), "grpc", where)
    return errors


# -- router.yaml -------------------------------------------------------------------------------


def check_router(path: Path = ROUTER, compose: Path = COMPOSE) -> list[str]:
    from services.router.config import RouterConfigError, load_router_config

    try:
        cfg = load_router_config(path, {})
    except RouterConfigError as exc:
        return [f"{path.name}: {exc}"]
    services = load_yaml(compose).get("services") or {}
    raw = load_yaml(path)
    errors = []
    if cfg.host != "0.0.0.0":
        errors.append(f"{path.name}: host must be 0.0.0.0 inside a container, got {cfg.host!r}")
    for expert in cfg.experts:
        for replica in expert.replicas:
            if expert.kind == "edge":
                errors += _check_target(
                    services, raw, replica, "grpc", f"{path.name}: {expert.expert_id}"
                )
    if cfg.gate is not None:
        for p in (cfg.gate.path, cfg.gate.subset_losses):
            if not (ROOT / p).exists():
                errors.append(
                    f"{path.name}: gate file {p} is not in the repository "
                    "(the image copies artifacts/)"
                )
    return errors


# -- prometheus.yml ------------------------------------------------------------------------------


def check_prometheus(path: Path = PROMETHEUS, compose: Path = COMPOSE) -> list[str]:
    try:
        doc = load_yaml(path)
    except yaml.YAMLError as exc:
        return [f"{path.name}: not valid YAML: {exc}"]
    services = load_yaml(compose).get("services") or {}
    router_cfg = load_yaml(ROUTER)
    jobs = {j.get("job_name"): j for j in doc.get("scrape_configs") or []}
    errors = [f"{path.name}: missing job {j!r}" for j in sorted(EXPECTED_JOBS - set(jobs))]
    scraped: set[tuple[str, int]] = set()
    for job_name, job in jobs.items():
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host, _, port = target.rpartition(":")
                if job_name == "prometheus":
                    continue
                errs = _check_target(
                    services, router_cfg, target, "metrics", f"{path.name}: job {job_name}"
                )
                errors += errs
                if not errs:
                    scraped.add((host, int(port)))
    for name, svc in services.items():  # every metrics port of every Tandem service is scraped
        for port in service_ports(name, svc, router_cfg)["metrics"]:
            if (name, port) not in scraped:
                errors.append(f"{path.name}: {name}:{port} (/metrics) is not scraped")
    return errors


# -- grafana -------------------------------------------------------------------------------------


class _Anything:
    """A permissive stand-in for what a scrape-time collector reads (engine, link, manager,
    store, selector, telemetry): every attribute and call is another _Anything, numbers are 0,
    containers are empty."""

    def __getattr__(self, name: str) -> _Anything:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs) -> _Anything:
        return _Anything()

    def __float__(self) -> float:
        return 0.0

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())


def _sample_names(family_name: str, family_type: str) -> set[str]:
    if family_type == "counter":
        return {family_name + "_total", family_name + "_created"}
    if family_type == "histogram":
        return {family_name + s for s in ("_bucket", "_sum", "_count", "_created")}
    if family_type == "summary":
        return {family_name, family_name + "_sum", family_name + "_count", family_name + "_created"}
    return {family_name}


def router_expert_namespace(expert_id: str) -> str:
    """Same rule as services.router.app._namespace (per-expert front-end metrics)."""
    return "tandem_router_" + re.sub(r"[^a-zA-Z0-9_]", "_", expert_id)


def known_metric_names(router_path: Path = ROUTER) -> set[str]:
    """Every sample name the four services export, from their metrics classes."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from prometheus_client import CollectorRegistry

    from services.attention_pool.metrics import AttnMetrics
    from services.cloud_ctx.metrics import CloudMetrics
    from services.edge_node.metrics import EdgeMetrics
    from services.router.metrics import RouterMetrics

    fake = _Anything()
    registries = []
    reg = CollectorRegistry()
    edge = EdgeMetrics(reg, model_name="m")
    edge.bind_engine(lambda: 0, 1)
    edge.bind_cloud_link(fake, lambda: 1.0)
    registries.append(reg)
    reg = CollectorRegistry()
    CloudMetrics(reg, model_name="m").bind_manager(fake)
    registries.append(reg)
    reg = CollectorRegistry()
    RouterMetrics(reg).watch(fake, fake)
    for expert in (load_yaml(router_path) or {}).get("experts") or []:
        EdgeMetrics(reg, model_name=expert["id"], namespace=router_expert_namespace(expert["id"]))
    registries.append(reg)
    reg = CollectorRegistry()
    AttnMetrics(reg, worker="0").bind_store(fake)
    registries.append(reg)
    names: set[str] = set()
    for reg in registries:
        for family in reg.collect():
            names |= _sample_names(family.name, family.type)
    return names


def dashboard_metric_names(dashboard: dict) -> dict[str, list[str]]:
    """metric name -> titles of the panels whose expressions use it."""
    used: dict[str, list[str]] = {}

    def walk(panels: Iterable[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels") or [])
            for target in panel.get("targets") or []:
                for name in METRIC_RE.findall(target.get("expr", "")):
                    used.setdefault(name, []).append(panel.get("title", "?"))

    walk(dashboard.get("panels") or [])
    return used


def check_dashboard(path: Path = DASHBOARD, known: set[str] | None = None) -> list[str]:
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path.name}: not valid JSON: {exc}"]
    errors = []
    used = dashboard_metric_names(dashboard)
    if not used:
        errors.append(f"{path.name}: no panel queries a tandem_* metric")
    known = known_metric_names() if known is None else known
    for name, titles in sorted(used.items()):
        if name not in known:
            errors.append(
                f"{path.name}: metric {name} (panels: {', '.join(sorted(set(titles)))}) "
                "is not exported by any service"
            )
    uid = _datasource_uid()
    for panel in _all_panels(dashboard.get("panels") or []):
        if panel.get("type") == "row":
            continue
        for ds in [panel.get("datasource")] + [
            t.get("datasource") for t in panel.get("targets") or []
        ]:
            if isinstance(ds, dict) and ds.get("uid") != uid:
                errors.append(
                    f"{path.name}: panel {panel.get('title')!r} uses datasource "
                    f"{ds.get('uid')!r}, provisioned is {uid!r}"
                )
    ids = [p.get("id") for p in _all_panels(dashboard.get("panels") or [])]
    if len(ids) != len(set(ids)):
        errors.append(f"{path.name}: duplicate panel ids")
    return errors


def _all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += _all_panels(p.get("panels") or [])
    return out


def _datasource_uid() -> str | None:
    sources = (load_yaml(DATASOURCES) or {}).get("datasources") or []
    return sources[0].get("uid") if sources else None


def check_grafana_provisioning() -> list[str]:
    errors = []
    sources = (load_yaml(DATASOURCES) or {}).get("datasources") or []
    if not sources or sources[0].get("type") != "prometheus":
        errors.append(f"{DATASOURCES.name}: expected one prometheus datasource")
    elif "prometheus:9090" not in str(sources[0].get("url")):
        errors.append(
            f"{DATASOURCES.name}: datasource url must be the compose service prometheus:9090"
        )
    providers = (load_yaml(PROVIDERS) or {}).get("providers") or []
    compose = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    mounted = {v.split(":")[1] for v in compose if v.startswith("./grafana/dashboards:")}
    for prov in providers:
        where = prov.get("options", {}).get("path")
        if where not in mounted:
            errors.append(
                f"{PROVIDERS.name}: provider path {where} is not where compose mounts the "
                f"dashboards ({sorted(mounted)})"
            )
    return errors


def run_all() -> list[str]:
    return (
        check_compose()
        + check_router()
        + check_prometheus()
        + check_grafana_provisioning()
        + check_dashboard()
    )


def main() -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    errors = run_all()
    for e in errors:
        print(f"check_config: {e}", file=sys.stderr)
    if errors:
        return 1
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    print(
        "check_config: ok (compose, router.yaml, prometheus.yml, grafana; "
        f"{len(used)} dashboard metrics exported)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
