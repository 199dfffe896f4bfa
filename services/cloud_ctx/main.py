"""Start one cloud context manager replica: the upper layers of a split model over gRPC,
sessions logged in Redis, /metrics + /health over HTTP.

    python -m services.cloud_ctx.main --model qwen15 --split 14 --quant bf16

Flags and their environment variables: --model (TANDEM_CLOUD_MODEL, default qwen15),
--split (TANDEM_CLOUD_SPLIT, default n_layers // 2), --quant (TANDEM_CLOUD_QUANT, bf16 |
int8 | int4), --host (HOST), --grpc-port (CLOUD_GRPC_PORT, 50061), --metrics-port
(CLOUD_METRICS_PORT, 9461), --redis-url (TANDEM_REDIS_URL, redis://127.0.0.1:6379/0),
--no-redis (TANDEM_NO_REDIS=1: sessions in memory only), --redis-prefix
(TANDEM_REDIS_PREFIX, default tandem:cloud:<model>:<split>:), --replica-id
(TANDEM_REPLICA_ID, default <hostname>-<pid>), --max-memory-mib (TANDEM_CLOUD_MAX_MEMORY_MIB),
--ttl (TANDEM_CLOUD_TTL seconds), --max-sessions (TANDEM_CLOUD_MAX_SESSIONS),
--max-context (TANDEM_MAX_CONTEXT), --cache-dir (TANDEM_CACHE), --device (TANDEM_DEVICE: auto |
cpu | cuda[:N]; cuda without a GPU is a startup error), --serial-log (log appends in line
before the catch-up forward instead of beside it; for benchmarks). Port 0 picks a free port.
Offload mode (Lamina): --attention-pool host:port,host:port (TANDEM_ATTENTION_POOL) sends
every attention of the cloud layers to those pool workers (services.attention_pool) and keeps
no KV here; --micro-batches (TANDEM_MICRO_BATCHES, default 2) ping-pongs the batch.
TANDEM_GRPC_TOKEN (no flag): require `authorization: Bearer <token>` on every gRPC call.
SIGTERM / SIGINT stop it gracefully (in-flight calls get a grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch
from prometheus_client import CollectorRegistry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.grpc_server import start_cloud_server
from services.cloud_ctx.metrics import CloudMetrics
from services.cloud_ctx.offload import OffloadRunner
from services.cloud_ctx.session_log import SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from services.cloud_ctx.weights import UpperHalf, load_upper_half
from tandem.clients.pool import WIRE_DTYPES, PoolClient, PoolShape, PoolUnavailable
from tandem.config_file import Settings
from tandem.energy.detect import describe, detect_meter
from tandem.energy.meter import EnergyMeter
from tandem.models.registry import ModelRegistry
from tandem.monitor import start_monitor
from tandem.runtime.device import DeviceUnavailable, resolve_device
from tandem.runtime.model import DecoderModel
from tandem.runtime.quant import QuantMode
from tandem.transport.grpc_tls import TlsConfig, tls_from_env_or

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudSettings:
    model: str
    split: int | None  # None: n_layers // 2
    quant: QuantMode
    host: str
    grpc_port: int
    metrics_port: int
    redis_url: str | None  # None: no Redis, sessions live in memory only
    redis_prefix: str | None  # None: tandem:cloud:<model>:<split>:
    replica_id: str
    limits: StoreLimits
    max_context: int
    cache_dir: Path
    grace_s: float = 5.0
    grpc_token: str | None = field(default=None, repr=False)  # TANDEM_GRPC_TOKEN
    tls: TlsConfig | None = None  # TANDEM_TLS_*: TLS on its gRPC server and to the pool
    attention_pool: tuple[str, ...] = ()  # offload mode: the pool workers' addresses
    micro_batches: int = 2
    serial_log: bool = False  # --serial-log: log writes in line, not beside the forward
    device: str = "cpu"  # --device / TANDEM_DEVICE, resolved: cpu or cuda:N


def parse_settings(registry: ModelRegistry, argv: list[str] | None = None) -> CloudSettings:
    env = os.environ.get
    file_cfg = Settings.from_argv(argv, "cloud_ctx")
    fenv = file_cfg.get
    p = argparse.ArgumentParser(description="Tandem cloud context manager (CE-CoLLM)")
    p.add_argument("--config", help="cluster YAML; this service reads its own section")
    p.add_argument("--name", help="this service's name in the cluster YAML")
    p.add_argument("--model", default=fenv("TANDEM_CLOUD_MODEL", "model", "qwen15"))
    p.add_argument("--split", type=int, default=fenv("TANDEM_CLOUD_SPLIT", "split"))
    quant_default = fenv("TANDEM_CLOUD_QUANT", "quant", "bf16")
    p.add_argument("--quant", choices=["bf16", "int8", "int4"], default=quant_default)
    p.add_argument("--host", default=fenv("HOST", "host", "127.0.0.1"))
    p.add_argument(
        "--grpc-port", type=int, default=int(fenv("CLOUD_GRPC_PORT", "grpc_port", "50061"))
    )
    p.add_argument(
        "--metrics-port", type=int, default=int(fenv("CLOUD_METRICS_PORT", "metrics_port", "9461"))
    )
    p.add_argument(
        "--redis-url", default=fenv("TANDEM_REDIS_URL", "redis_url", "redis://127.0.0.1:6379/0")
    )
    p.add_argument(
        "--no-redis",
        action="store_true",
        default=str(fenv("TANDEM_NO_REDIS", "no_redis", "")).lower() not in ("", "0", "false"),
        help="keep sessions in memory only (a restart loses them)",
    )
    p.add_argument("--redis-prefix", default=fenv("TANDEM_REDIS_PREFIX", "redis_prefix"))
    p.add_argument(
        "--replica-id",
        default=fenv("TANDEM_REPLICA_ID", "replica_id", f"{socket.gethostname()}-{os.getpid()}"),
    )
    limits = StoreLimits()
    p.add_argument(
        "--max-memory-mib",
        type=float,
        default=float(
            fenv("TANDEM_CLOUD_MAX_MEMORY_MIB", "max_memory_mib", limits.max_bytes / 2**20)
        ),
    )
    p.add_argument(
        "--ttl", type=float, default=float(fenv("TANDEM_CLOUD_TTL", "ttl", limits.ttl_s))
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=int(fenv("TANDEM_CLOUD_MAX_SESSIONS", "max_sessions", limits.max_sessions)),
    )
    p.add_argument(
        "--max-context", type=int, default=int(fenv("TANDEM_MAX_CONTEXT", "max_context", "4096"))
    )
    p.add_argument("--cache-dir", default=fenv("TANDEM_CACHE", "cache_dir", "model_cache"))
    p.add_argument(
        "--attention-pool",
        default=fenv("TANDEM_ATTENTION_POOL", "attention_pool", ""),
        help="offload mode: comma-separated host:port of the attention pool workers",
    )
    p.add_argument(
        "--micro-batches", type=int, default=int(fenv("TANDEM_MICRO_BATCHES", "micro_batches", "2"))
    )
    p.add_argument("--device", default=fenv("TANDEM_DEVICE", "device", "auto"))
    p.add_argument(
        "--serial-log",
        action="store_true",
        help="write the session log in line instead of beside the catch-up forward "
        "(the old path; for benchmarks)",
    )
    a = p.parse_args(argv)
    unknown = file_cfg.unknown([act.dest for act in p._actions])
    if unknown:
        p.error(f"unknown key(s) in this service's config section: {', '.join(unknown)}")
    try:
        device = str(resolve_device(a.device).torch_device)
    except (DeviceUnavailable, ValueError) as exc:
        p.error(str(exc))
    try:
        registry.get(a.model)
    except KeyError as exc:
        p.error(str(exc))
    if a.ttl <= 0 or a.max_sessions < 1 or a.max_memory_mib <= 0:
        p.error("--ttl, --max-sessions and --max-memory-mib must be positive")
    return CloudSettings(
        model=a.model,
        split=int(a.split) if a.split is not None else None,
        quant=a.quant,
        host=a.host,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        redis_url=None if a.no_redis else a.redis_url,
        redis_prefix=a.redis_prefix,
        replica_id=a.replica_id,
        limits=StoreLimits(int(a.max_memory_mib * 2**20), a.ttl, a.max_sessions),
        max_context=a.max_context,
        cache_dir=Path(a.cache_dir),
        grpc_token=env("TANDEM_GRPC_TOKEN") or None,
        tls=tls_from_env_or(p.error),
        attention_pool=tuple(x.strip() for x in a.attention_pool.split(",") if x.strip()),
        micro_batches=a.micro_batches,
        serial_log=a.serial_log,
        device=device,
    )


def cloud_meter(device: str) -> EnergyMeter:
    dev = torch.device(device)
    meter = detect_meter(gpu_index=(dev.index or 0) if dev.type == "cuda" else None)
    log.info("device %s; energy per request: %s", device, describe(meter))
    return meter


def offload_runner(settings: CloudSettings, model: DecoderModel, split: int) -> OffloadRunner:
    """Connect to the attention pool (waits for its workers) and run the layers through it."""
    cfg = model.cfg
    wire = model.dtype if model.dtype in WIRE_DTYPES else torch.float16
    shape = PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, wire)
    try:
        pool = PoolClient(
            settings.attention_pool, shape, token=settings.grpc_token, tls=settings.tls
        )
    except PoolUnavailable as exc:
        raise SystemExit(f"cloud_ctx: attention pool not reachable: {exc}") from None
    return OffloadRunner(model, split, pool, micro_batches=settings.micro_batches)


def connect_redis(url: str) -> redis.Redis:
    """A client for `url` that answered PING; SystemExit saying what to do otherwise."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
            # few, short retries: the model thread waits on every log write
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise SystemExit(
            f"cloud_ctx: cannot reach Redis at {url} ({exc}).\n"
            "  Start one with `bash scripts/redis.sh start` (then TANDEM_REDIS_URL=$(bash "
            "scripts/redis.sh url)), or run `make run-cloud`,\n"
            "  or pass --no-redis to keep sessions in memory only."
        ) from None
    return client


def _redis_where(client: redis.Redis) -> str:
    kw = client.get_connection_kwargs()  # no password in the banner
    return f"redis://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


@dataclass(frozen=True)
class CloudEndpoints:
    grpc_port: int
    metrics_port: int


async def serve(
    settings: CloudSettings,
    upper: UpperHalf,
    client: redis.Redis | None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[CloudEndpoints], None] | None = None,
) -> None:
    """Serve until `stop` is set (default: until SIGTERM or SIGINT); `on_ready` gets the
    bound ports once both servers listen."""
    model, split = upper.model, upper.split
    runner = offload_runner(settings, model, split) if settings.attention_pool else None
    if runner is not None:  # no KV here: the store only holds pending rows
        n = model.cfg.n_layers
        store = SessionStore(
            lambda: model.new_kv(first_layer=n, last_layer=n),
            settings.limits,
            on_drop=runner.release,
        )
    else:
        store = SessionStore(lambda: model.new_kv(first_layer=split), settings.limits)
    session_log = None
    if client is not None:
        prefix = settings.redis_prefix or f"tandem:cloud:{settings.model}:{split}:"
        session_log = SessionLog(
            client, replica_id=settings.replica_id, ttl_s=settings.limits.ttl_s, prefix=prefix
        )
    manager = CloudContextManager(
        model, split, store, session_log, runner, overlap_log=not settings.serial_log
    )
    registry = CollectorRegistry()
    metrics = CloudMetrics(registry, model_name=settings.model)
    metrics.bind_manager(manager)

    def health():
        redis_ok = session_log.ping() if session_log is not None else None
        return redis_ok is not False, {
            "model": settings.model,
            "split": split,
            "layers": model.cfg.n_layers,
            "replica": settings.replica_id,
            "sessions": len(store),
            "redis": {None: "off", True: "ok", False: "down"}[redis_ok],
        }

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    monitor = start_monitor(registry, health, settings.host, settings.metrics_port)
    try:
        server = await start_cloud_server(
            manager,
            settings.host,
            settings.grpc_port,
            metrics,
            token=settings.grpc_token,
            tls=settings.tls,
            meter=cloud_meter(settings.device),
        )
    except BaseException:
        monitor.stop()
        raise
    where = _redis_where(client) if session_log is not None else "off (memory only)"
    print(
        f"Tandem cloud context: model={settings.model} split={split}/{model.cfg.n_layers} "
        f"quant={settings.quant} replica={settings.replica_id}\n"
        f"  gRPC: {settings.host}:{server.port}   "
        f"metrics: http://{settings.host}:{monitor.port}/metrics\n"
        f"  redis: {where}" + (f" prefix={session_log.prefix}" if session_log is not None else ""),
        flush=True,
    )
    if on_ready is not None:
        on_ready(CloudEndpoints(server.port, monitor.port))
    try:
        await stop.wait()
        log.info("stopping: %.0f s grace for in-flight calls", settings.grace_s)
    finally:
        await server.stop(settings.grace_s)
        manager.close()
        monitor.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(int(os.environ.get("TANDEM_THREADS", os.cpu_count() or 2)))
    registry = ModelRegistry()
    settings = parse_settings(registry, argv)
    client = connect_redis(settings.redis_url) if settings.redis_url else None
    try:
        upper = load_upper_half(
            registry.get(settings.model),
            settings.split,
            settings.quant,
            settings.max_context,
            settings.cache_dir,
            settings.device,
        )
    except ValueError as exc:
        raise SystemExit(f"cloud_ctx: {exc}") from None
    try:
        asyncio.run(serve(settings, upper, client))
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    main()
