"""Start the router: the OpenAI-compatible front door over the configured experts.

    python -m services.router.main --config configs/router.yaml

The YAML file (`services.router.config`) lists the experts and their replicas; HOST, PORT,
TANDEM_API_KEY and TANDEM_GRPC_TOKEN override it. With a `gate` section the router loads the
trained gate, its subset-loss table and the feature model (smollm2, ~0.1 GB), and serves
`"model": "auto"` with MoE²; without one it serves the named experts only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.router.app import build_router_app
from services.router.config import DEFAULT_CONFIG, RouterConfig, load_router_config
from services.router.expert_engine import ExpertEngine
from services.router.features import ModelFeaturizer
from services.router.gate import Gate
from services.router.moe2 import Moe2Selector
from services.router.openai_engine import OpenAIEngine
from services.router.planner import SubsetLossTable
from services.router.predictor import Predictor
from services.router.profiles import DEVICE_PROFILES, ExpertSpec
from services.router.replicas import HealthMonitor, ReplicaTable, default_prober
from services.router.self_score import DEFAULT_PICKS, SelfScorePicks
from services.router.telemetry import LatencyTelemetry
from tandem.runtime.engine_api import Engine
from tandem.transport.grpc_tls import TlsConfig, tls_from_env_or

log = logging.getLogger("tandem.router")


def expert_specs(config: RouterConfig) -> dict[str, ExpertSpec]:
    specs = {}
    for e in config.experts:
        if e.decode_s_per_token is None or e.prefill_s_per_token is None:
            raise SystemExit(
                f"router: expert {e.expert_id!r} needs decode_ms_per_token and "
                "prefill_ms_per_token in the config (no reference timing for it)"
            )
        specs[e.expert_id] = ExpertSpec(
            e.expert_id,
            DEVICE_PROFILES[e.device],
            e.decode_s_per_token,
            e.prefill_s_per_token,
            replicas=len(e.replicas),
        )
    return specs


def expert_engines(
    config: RouterConfig, table: ReplicaTable, tls: TlsConfig | None = None
) -> dict[str, Engine]:
    engines: dict[str, Engine] = {}
    for e in config.experts:
        if e.kind == "edge":
            engines[e.expert_id] = ExpertEngine(
                e.expert_id, table, max_context=e.max_context, tls=tls
            )
        else:
            engines[e.expert_id] = OpenAIEngine(
                e.expert_id, table, max_context=e.max_context, upstream_model=e.upstream_model
            )
    return engines


def build(
    config: RouterConfig,
    *,
    registry: CollectorRegistry | None = None,
    tls: TlsConfig | None = None,
) -> FastAPI:
    """The router app for `config` (loads the gate and the feature model when configured)."""
    table = ReplicaTable(config.experts, failure_threshold=config.health.failure_threshold)
    telemetry = LatencyTelemetry(
        alpha=config.telemetry.alpha, resolve_ratio=config.telemetry.resolve_ratio
    )
    predictor = Predictor(expert_specs(config), telemetry)
    selector = featurizer = picks = None
    if config.gate is not None:
        for path in (config.gate.path, config.gate.subset_losses):
            if not path.exists():
                raise SystemExit(f"router: gate file {path} is missing (train it: make gate)")
        gate = Gate.load(config.gate.path)
        selector = Moe2Selector(
            gate, SubsetLossTable.load(config.gate.subset_losses), predictor, table.healthy_experts
        )
        log.info("router: MoE² over %s (gate experts %s)", selector.experts, gate.experts)
        featurizer = ModelFeaturizer.load(config.gate.feature_model)
        # k > 1 across tokenizers: the pick by prompt scores, where fitted beside the gate
        # (python -m services.router.self_score); without it, the plurality vote.
        picks_path = config.gate.path.with_name(DEFAULT_PICKS.name)
        if picks_path.exists():
            picks = SelfScorePicks.load(picks_path)
    monitor = HealthMonitor(
        table,
        default_prober(timeout_s=config.health.timeout_s, tls=tls),
        interval_s=config.health.interval_s,
        timeout_s=config.health.timeout_s,
    )
    return build_router_app(
        expert_engines(config, table, tls),
        table,
        predictor,
        selector=selector,
        featurizer=featurizer,
        budget_defaults=config.budgets,
        api_key=config.api_key,
        min_ready=config.min_ready,
        limits=config.limits,
        registry=registry,
        monitor=monitor,
        admission=config.admission,
        picks=picks,
    )


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> None:
    ap = argparse.ArgumentParser(description="Tandem router (OpenAI API, MoE² routing)")
    ap.add_argument(
        "--config",
        type=Path,
        default=Path(env.get("TANDEM_ROUTER_CONFIG") or env.get("TANDEM_CONFIG") or DEFAULT_CONFIG),
        help="router YAML, or a cluster YAML with a `router:` section",
    )
    ap.add_argument("--name", help="ignored (the router's section is `router:`)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # the feature model shares the box with the event loop
    config = load_router_config(args.config, env)
    # TANDEM_TLS_CA (+ cert/key for mTLS) towards the edge nodes
    tls = tls_from_env_or(lambda why: sys.exit(f"router: {why}"), env)
    app = build(config, tls=tls)
    log.info(
        "router: %d experts, listening on %s:%d", len(config.experts), config.host, config.port
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
