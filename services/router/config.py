"""The router's configuration file (YAML), e.g. `configs/router.yaml`:

    host: 127.0.0.1
    port: 8080
    min_ready: 1                # /ready needs this many experts with a healthy replica
    health: {interval_s: 1.0, timeout_s: 1.0, failure_threshold: 2}
    budgets:                    # server defaults; null = no limit
      latency_ms: null
      energy_j: null
      best_effort: false
      top_k: 1
      max_top_k: 4
    gate:                       # MoE² for model "auto"; omit or null to serve named experts only
      path: artifacts/gate/gate.pt
      subset_losses: artifacts/gate/subset_loss.json
      feature_model: smollm2
    telemetry: {alpha: 0.2, resolve_ratio: 1.25}
    limits: {max_body_bytes: 1048576, max_tokens_cap: 2048}
    admission: {max_in_flight: 64, max_per_client: 16}   # beyond: 429 + Retry-After
    experts: [...]              # services.router.experts

Environment variables override the file: HOST, PORT, TANDEM_API_KEY (the client API key;
unset: no auth), TANDEM_GRPC_TOKEN (bearer token for edge replicas without their own `token`).
Every mistake raises `RouterConfigError` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from services.router.admission import AdmissionLimits
from services.router.budget import BudgetDefaults
from services.router.experts import ExpertConfig, ExpertConfigError, parse_experts
from tandem.api.limits import ApiLimits

DEFAULT_CONFIG = Path("configs/router.yaml")
_TOP = {
    "host",
    "port",
    "min_ready",
    "health",
    "budgets",
    "gate",
    "telemetry",
    "limits",
    "admission",
    "experts",
}


class RouterConfigError(ValueError):
    """The router configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class HealthSettings:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    failure_threshold: int = 2


@dataclass(frozen=True)
class GateSettings:
    path: Path
    subset_losses: Path
    feature_model: str = "smollm2"


@dataclass(frozen=True)
class TelemetrySettings:
    alpha: float = 0.2
    resolve_ratio: float = 1.25


@dataclass(frozen=True)
class RouterConfig:
    experts: tuple[ExpertConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    min_ready: int = 1
    api_key: str | None = None
    health: HealthSettings = HealthSettings()
    budgets: BudgetDefaults = BudgetDefaults()
    gate: GateSettings | None = None
    telemetry: TelemetrySettings = TelemetrySettings()
    limits: ApiLimits = ApiLimits()
    admission: AdmissionLimits = AdmissionLimits()


def _section(raw: Mapping[str, Any], key: str, cls: type, **convert: Any) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RouterConfigError(f"router config: {key!r} must be a mapping")
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(value) - fields)
    if unknown:
        raise RouterConfigError(
            f"router config: {key}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {k: convert.get(k, lambda v: v)(v) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RouterConfigError(f"router config: {key}: {exc}") from exc


def _number(value: Any, key: str, *, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "an integer" if integer else "a number"
        raise RouterConfigError(f"router config: {key!r} must be {kind} > 0, got {value!r}")
    return value


def parse_router_config(
    raw: object, env: Mapping[str, str], base_dir: Path = Path(".")
) -> RouterConfig:
    """A `RouterConfig` from the parsed YAML and the environment. Relative gate paths are
    resolved against `base_dir` (the repository root when run from it)."""
    if not isinstance(raw, Mapping):
        raise RouterConfigError("router config: the file must hold a mapping")
    unknown = sorted(str(k) for k in raw if k not in _TOP)
    if unknown:
        allowed = ", ".join(sorted(_TOP))
        raise RouterConfigError(
            f"router config: unknown key(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    try:
        experts = parse_experts(raw)
    except ExpertConfigError as exc:
        raise RouterConfigError(str(exc)) from exc
    grpc_token = env.get("TANDEM_GRPC_TOKEN") or None
    if grpc_token:
        experts = tuple(
            replace(e, token=grpc_token) if e.kind == "edge" and e.token is None else e
            for e in experts
        )
    gate = _section(
        raw, "gate", GateSettings, path=lambda p: base_dir / p, subset_losses=lambda p: base_dir / p
    )
    port = env.get("PORT") or raw.get("port", 8080)
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise RouterConfigError(f"router config: port must be an integer, got {port!r}") from None
    return RouterConfig(
        experts=experts,
        host=str(env.get("HOST") or raw.get("host", "127.0.0.1")),
        port=port,
        min_ready=_number(raw.get("min_ready", 1), "min_ready", integer=True),
        api_key=env.get("TANDEM_API_KEY") or None,
        health=_section(raw, "health", HealthSettings) or HealthSettings(),
        budgets=_section(raw, "budgets", BudgetDefaults) or BudgetDefaults(),
        gate=gate,
        telemetry=_section(raw, "telemetry", TelemetrySettings) or TelemetrySettings(),
        limits=_section(raw, "limits", ApiLimits) or ApiLimits(),
        admission=_section(raw, "admission", AdmissionLimits) or AdmissionLimits(),
    )


def load_router_config(path: Path, env: Mapping[str, str]) -> RouterConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RouterConfigError(f"router config: cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RouterConfigError(f"router config: {path} is not valid YAML: {exc}") from exc
    if isinstance(raw, Mapping) and "router" in raw and "experts" not in raw:
        raw = raw["router"]  # a whole-cluster file (configs/cluster.yaml): the router's part
    return parse_router_config(raw, env)
