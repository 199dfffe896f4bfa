"""Start one edge node: OpenAI HTTP API + gRPC API over one EdgeEngine.

    python -m services.edge_node.main --model smollm2 --quant int8 --tau 0.9

Collaborative mode (CE-CoLLM): run layers [0, split) here and ask a cloud context manager
(services.cloud_ctx) for the tokens no edge exit is confident about:

    python -m services.edge_node.main --model qwen15 --split auto --cloud 127.0.0.1:50061

Every flag has an environment variable (TANDEM_MODEL, TANDEM_QUANT, TANDEM_TAU, HOST, PORT,
GRPC_PORT, TANDEM_API_KEY, TANDEM_GRPC_TOKEN, TANDEM_MAX_BATCH, TANDEM_MAX_CONTEXT,
TANDEM_SPLIT, TANDEM_CLOUD, TANDEM_CLOUD_ENCODING, TANDEM_CLOUD_TIMEOUT, TANDEM_TAU_MIN,
TANDEM_CLOUD_BUDGET_MS, TANDEM_COMPILE, TANDEM_DEVICE: auto | cpu | cuda[:N]).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from prometheus_client import CollectorRegistry

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.grpc_server import start_grpc_server
from services.edge_node.metrics import EdgeMetrics
from services.edge_node.tau_policy import TauPolicy
from tandem.api.app import build_app
from tandem.api.limits import ApiLimits
from tandem.config_file import Settings
from tandem.energy.detect import describe, detect_meter
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.device import DeviceUnavailable, resolve_device
from tandem.runtime.quant import QuantMode
from tandem.transport.grpc_tls import TlsConfig, tls_from_env_or

log = logging.getLogger(__name__)


def compile_setting(value: str | bool) -> bool:
    """TANDEM_COMPILE (or the config file's `compile`) as a bool: off for 0 / false."""
    return str(value).strip().lower() not in ("0", "false")


@dataclass(frozen=True)
class EdgeSettings:
    model: str
    quant: QuantMode
    tau: float
    host: str
    port: int
    grpc_port: int
    max_batch: int
    max_context: int
    api_key: str | None = field(repr=False)
    grpc_token: str | None = field(repr=False)
    cache_dir: Path
    split: int | None = None  # collaborative mode: run layers [0, split) only
    cloud: str | None = None  # host:port of the cloud context manager
    cloud_encoding: str = "fp16"
    cloud_timeout_s: float = 2.0
    tau_min: float = 0.5
    cloud_budget_ms: float = 200.0
    collab: str = "final"  # "speculative": confident tokens are drafts the cloud checks
    compiled: bool = True  # TANDEM_COMPILE=0 / --no-compile: the eager reference path
    tls: TlsConfig | None = None  # TANDEM_TLS_*: TLS on its gRPC server and to the cloud
    device: str = "cpu"  # TANDEM_DEVICE / --device, resolved: cpu or cuda:N


def parse_settings(registry: ModelRegistry, argv: list[str] | None = None) -> EdgeSettings:
    env = os.environ.get
    file_cfg = Settings.from_argv(argv, "edge")
    fenv = file_cfg.get
    p = argparse.ArgumentParser(description="Tandem edge node")
    p.add_argument("--config", help="cluster YAML; this service reads its own section")
    p.add_argument("--name", help="this service's name in the cluster YAML")
    p.add_argument("--model", default=fenv("TANDEM_MODEL", "model", "smollm2"))
    p.add_argument(
        "--quant", choices=["bf16", "int8", "int4"], default=fenv("TANDEM_QUANT", "quant")
    )
    p.add_argument("--tau", type=float, default=fenv("TANDEM_TAU", "tau"))
    p.add_argument("--host", default=fenv("HOST", "host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(fenv("PORT", "port", "8000")))
    p.add_argument("--grpc-port", type=int, default=int(fenv("GRPC_PORT", "grpc_port", "50051")))
    p.add_argument("--max-batch", type=int, default=int(fenv("TANDEM_MAX_BATCH", "max_batch", "8")))
    p.add_argument(
        "--max-context", type=int, default=int(fenv("TANDEM_MAX_CONTEXT", "max_context", "4096"))
    )
    p.add_argument("--cache-dir", default=fenv("TANDEM_CACHE", "cache_dir", "model_cache"))
    p.add_argument(
        "--split",
        default=fenv("TANDEM_SPLIT", "split"),
        help="collaborative mode: edge layers [0, split); 'auto' = the middle exit layer",
    )
    p.add_argument("--cloud", default=fenv("TANDEM_CLOUD", "cloud"), help="cloud_ctx host:port")
    p.add_argument(
        "--collab",
        choices=["final", "speculative"],
        default=fenv("TANDEM_COLLAB", "collab", "final"),
        help="collaborative mode: 'final' (CE-CoLLM: a confident edge token is final) or "
        "'speculative' (lossless: it is a draft the cloud checks; output equals cloud-only)",
    )
    p.add_argument(
        "--cloud-encoding",
        choices=["fp16", "int8"],
        default=fenv("TANDEM_CLOUD_ENCODING", "cloud_encoding", "fp16"),
    )
    p.add_argument(
        "--cloud-timeout",
        type=float,
        default=float(fenv("TANDEM_CLOUD_TIMEOUT", "cloud_timeout", "2.0")),
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_setting(fenv("TANDEM_COMPILE", "compile", "1")),
        help="compiled decode step (static KV slots); --no-compile: the eager reference",
    )
    p.add_argument(
        "--tau-min",
        type=float,
        default=fenv("TANDEM_TAU_MIN", "tau_min"),
        help="latency-aware floor of tau; default: 0.5 with --collab speculative (lossless), "
        "tau itself with --collab final, where a lower tau would break the agreement it stands for",
    )
    p.add_argument(
        "--cloud-budget-ms",
        type=float,
        default=float(fenv("TANDEM_CLOUD_BUDGET_MS", "cloud_budget_ms", "200")),
    )
    p.add_argument("--device", default=fenv("TANDEM_DEVICE", "device", "auto"))
    a = p.parse_args(argv)
    unknown = file_cfg.unknown([act.dest for act in p._actions])
    if unknown:
        p.error(f"unknown key(s) in this service's config section: {', '.join(unknown)}")
    try:
        device = str(resolve_device(a.device).torch_device)
    except (DeviceUnavailable, ValueError) as exc:
        p.error(str(exc))
    try:
        spec = registry.get(a.model)  # per-model defaults for quant and tau
    except KeyError as exc:
        p.error(str(exc))
    split = None
    if a.split:
        exits = spec.exit_layers
        split = exits[len(exits) // 2] if a.split == "auto" else int(a.split)
        if split not in exits:
            p.error(f"--split {split}: must be one of {spec.id}'s exit layers {exits}")
    if a.cloud and split is None:
        p.error("--cloud needs --split (collaborative mode runs the edge half of the model)")
    tau = float(a.tau) if a.tau is not None else spec.default_tau
    tau_min = float(a.tau_min) if a.tau_min is not None else None
    if a.collab == "final" and tau_min is not None and tau_min < tau:
        p.error(
            f"--tau-min {tau_min} < --tau {tau}: with --collab final a lower threshold lets "
            "through tokens below the agreement tau promises; use --collab speculative"
        )
    if tau_min is None:
        tau_min = min(0.5, tau) if a.collab == "speculative" else tau
    return EdgeSettings(
        model=a.model,
        quant=a.quant or spec.default_quant,
        tau=tau,
        host=a.host,
        port=a.port,
        grpc_port=a.grpc_port,
        max_batch=a.max_batch,
        max_context=a.max_context,
        api_key=env("TANDEM_API_KEY") or None,
        grpc_token=env("TANDEM_GRPC_TOKEN") or None,
        tls=tls_from_env_or(p.error),
        cache_dir=Path(a.cache_dir),
        split=split,
        cloud=a.cloud or None,
        cloud_encoding=a.cloud_encoding,
        cloud_timeout_s=a.cloud_timeout,
        tau_min=tau_min,
        cloud_budget_ms=a.cloud_budget_ms,
        collab=a.collab,
        compiled=a.compile,
        device=device,
    )


def build_engine(settings: EdgeSettings, registry: ModelRegistry) -> EdgeEngine:
    spec = registry.get(settings.model)
    loaded = load_model(
        spec,
        LoadOptions(
            quant=settings.quant,
            exits=settings.tau < 1.0 or settings.split is not None,
            max_context=settings.max_context,
            cache_dir=settings.cache_dir,
            compiled=settings.compiled,
            kv_slots=max(16, 2 * settings.max_batch),
            device=settings.device,
        ),
    )
    config = EngineConfig(
        max_batch=settings.max_batch,
        max_context=settings.max_context,
        tau=settings.tau,
        collab=settings.collab,
    )
    if settings.split is not None:  # the cloud runs the rest
        loaded.model.drop_layers(range(settings.split, loaded.model.cfg.n_layers))
    cloud = None
    if settings.cloud is not None:
        cloud = CloudLink(
            CloudLinkConfig(
                target=settings.cloud,
                encoding=settings.cloud_encoding,
                timeout_s=settings.cloud_timeout_s,
                client_id=f"{spec.id}-{os.getpid()}",
                token=settings.grpc_token,
                tls=settings.tls,
            )
        )
        cloud.start()
    speculative = settings.collab == "speculative" and cloud is not None
    # speculative: drafts come from the split head only (every row reaches the split)
    decoder = loaded.decoder(config.max_deferred, depth=settings.split, split_only=speculative)
    if settings.compiled:
        use_exits = settings.tau < 1.0 or settings.split is not None
        try:
            seconds = decoder.warm_up(use_exits)
            log.info(
                "compiled the decode step for layer ranges %s%s in %.1f s",
                decoder.ranges(use_exits),
                " and the exit heads" if use_exits else "",
                seconds,
            )
        except Exception as exc:  # e.g. no C++ compiler in the image: serve, but say so
            log.error("compiling the decode step failed, serving the eager path: %s", exc)
            loaded.model.compiled = None
    device = torch.device(settings.device)
    meter = detect_meter(gpu_index=(device.index or 0) if device.type == "cuda" else None)
    log.info("device %s; energy per request: %s", settings.device, describe(meter))
    return EdgeEngine(
        spec.id,
        decoder,
        loaded.codec,
        config,
        cloud=cloud,
        tau_policy=TauPolicy(
            settings.tau, min(settings.tau_min, settings.tau), settings.cloud_budget_ms
        ),
        meter=meter,
    )


async def serve(settings: EdgeSettings, registry: ModelRegistry) -> None:
    engine = build_engine(settings, registry)
    engine.start()
    metrics = EdgeMetrics(CollectorRegistry(), model_name=engine.model_id)
    if engine.cloud is not None:
        metrics.bind_cloud_link(engine.cloud, lambda: engine.tau_now)
    metrics.bind_energy(engine.stats, engine.energy_source)
    app = build_app(
        engine,
        served_model_id=engine.model_id,
        limits=ApiLimits(),
        metrics=metrics,
        api_key=settings.api_key,
    )
    grpc_server = await start_grpc_server(
        engine, settings.host, settings.grpc_port, token=settings.grpc_token, tls=settings.tls
    )
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port))
    base = f"http://{settings.host}:{settings.port}/v1"
    mode = "standalone" if settings.split is None else f"split at {settings.split}"
    if engine.cloud is not None:
        mode += f", cloud {settings.cloud} ({settings.cloud_encoding})"
    print(
        f"Tandem edge node: model={engine.model_id} quant={settings.quant} tau={settings.tau} "
        f"({mode})\n"
        f"  OpenAI API: {base}   gRPC: {settings.host}:{grpc_server.port}\n"
        f"  try: curl {base}/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{engine.model_id}", "messages": [{{"role": "user", """
        f""""content": "Why is the sky blue?"}}], "max_tokens": 64}}'""",
        flush=True,
    )
    try:
        await server.serve()
    finally:
        await grpc_server.stop()
        engine.stop()
        if engine.cloud is not None:
            engine.cloud.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(int(os.environ.get("TANDEM_THREADS", os.cpu_count() or 2)))
    registry = ModelRegistry()
    asyncio.run(serve(parse_settings(registry, argv), registry))


if __name__ == "__main__":
    main()
