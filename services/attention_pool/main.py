"""Start an attention pool: N worker processes, worker i holding KV heads partition i of the
model's KV heads for the cloud layers [first_layer, n_layers).

    python -m services.attention_pool.main --model qwen15 --workers 2 --port 50071

The parent resolves the model shape, starts the workers (`--worker-index i`, the same module),
waits until each serves, prints their addresses (the line `--attention-pool a,b` is what
cloud_ctx takes), forwards SIGTERM / SIGINT and stops them all; if one dies it stops the rest
and exits 1 (a supervisor restarts the pool; the compute side sees the new worker_id and
rebuilds the KV). A worker exits on its own when its parent is gone (no orphans).

Flags and their environment variables:
  --model (TANDEM_ATTN_MODEL, default qwen15), --cache-dir (TANDEM_CACHE, model_cache): the
    shape comes from the converted model's config.json (no weights are loaded);
  --n-heads --n-kv-heads --head-dim --n-layers (model totals) and --scale (default
    head_dim ** -0.5): an explicit shape (all four given: no model is read; some: they override);
  --first-layer (TANDEM_ATTN_FIRST_LAYER, default n_layers // 2: cloud_ctx's default split);
  --workers (TANDEM_ATTN_WORKERS, 1; must divide n_kv_heads);
  --host (HOST, 127.0.0.1), --port (ATTN_GRPC_PORT, 50071), --metrics-port
    (ATTN_METRICS_PORT, 9471): worker i listens on port + i and metrics-port + i; 0 picks
    free ports;
  --capacity-mb (TANDEM_ATTN_CAPACITY_MB, 1024): KV capacity of each worker;
  --dtype (TANDEM_ATTN_DTYPE, bf16 | fp16): the KV cache's dtype;
  --load-wait-s (TANDEM_ATTN_LOAD_WAIT_S, 5): how long an Attend waits for LoadKV;
  --threads (TANDEM_ATTN_THREADS, 1): torch threads per worker (one worker = one core);
  --device (TANDEM_DEVICE, auto | cpu | cuda[:N]): where each worker's KV and attention live.
TANDEM_GRPC_TOKEN (no flag): every call but Stats needs `authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from services.attention_pool.kv_store import KVStore
from services.attention_pool.metrics import AttnMetrics
from services.attention_pool.worker import (
    AttentionWorkerServicer,
    ModelShape,
    start_attention_worker,
)
from tandem.config_file import Settings
from tandem.monitor import start_monitor
from tandem.runtime.device import DeviceUnavailable, resolve_device
from tandem.transport.grpc_tls import TlsConfig, tls_from_env_or

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PoolSettings:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    n_layers: int  # the model's layers
    first_layer: int  # the pool holds [first_layer, n_layers)
    workers: int
    host: str
    port: int
    metrics_port: int
    capacity_mb: float
    dtype: str
    load_wait_s: float
    threads: int
    model: str | None = None
    grace_s: float = 5.0
    device: str = "cpu"  # --device / TANDEM_DEVICE, resolved: cpu or cuda:N

    @property
    def heads_per_worker(self) -> int:
        return self.n_kv_heads // self.workers

    def head_range(self, index: int) -> tuple[int, int]:
        return index * self.heads_per_worker, (index + 1) * self.heads_per_worker

    def port_of(self, base: int, index: int) -> int:
        return base + index if base else 0

    def worker_args(self, index: int, ready_file: Path) -> list[str]:
        """Flags for worker `index` (the shape is explicit: workers read no model)."""
        return [
            *("--n-heads", str(self.n_heads), "--n-kv-heads", str(self.n_kv_heads)),
            *("--head-dim", str(self.head_dim), "--scale", repr(self.scale)),
            *("--n-layers", str(self.n_layers), "--first-layer", str(self.first_layer)),
            *("--workers", str(self.workers), "--worker-index", str(index)),
            *("--host", self.host, "--port", str(self.port)),
            *("--metrics-port", str(self.metrics_port)),
            *("--capacity-mb", repr(self.capacity_mb), "--dtype", self.dtype),
            *("--load-wait-s", repr(self.load_wait_s), "--threads", str(self.threads)),
            *("--device", self.device),
            *("--ready-file", str(ready_file), "--parent-pid", str(os.getpid())),
        ]


def _model_shape(model: str, cache_dir: Path):
    from tandem.models.convert import ensure_converted
    from tandem.models.registry import ModelRegistry
    from tandem.runtime.config import ArchConfig

    try:
        spec = ModelRegistry().get(model)
    except KeyError as exc:
        raise SystemExit(f"attention_pool: {exc}") from None
    return ArchConfig.from_dir(ensure_converted(spec, cache_dir))


def parse_args(argv: list[str] | None = None) -> tuple[PoolSettings, argparse.Namespace]:
    file_cfg = Settings.from_argv(argv, "attention_pool")
    fenv = file_cfg.get
    p = argparse.ArgumentParser(description="Tandem attention pool (Lamina)")
    p.add_argument("--config", help="cluster YAML; this service reads its own section")
    p.add_argument("--name", help="this service's name in the cluster YAML")
    p.add_argument("--model", default=fenv("TANDEM_ATTN_MODEL", "model", "qwen15"))
    p.add_argument("--cache-dir", default=fenv("TANDEM_CACHE", "cache_dir", "model_cache"))
    p.add_argument("--n-heads", type=int, default=fenv(None, "n_heads"))
    p.add_argument("--n-kv-heads", type=int, default=fenv(None, "n_kv_heads"))
    p.add_argument("--head-dim", type=int, default=fenv(None, "head_dim"))
    p.add_argument(
        "--n-layers", type=int, default=fenv(None, "n_layers"), help="the model's layers (total)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=fenv(None, "scale"),
        help="attention scale (default head_dim ** -0.5)",
    )
    p.add_argument(
        "--first-layer", type=int, default=fenv("TANDEM_ATTN_FIRST_LAYER", "first_layer")
    )
    p.add_argument("--workers", type=int, default=int(fenv("TANDEM_ATTN_WORKERS", "workers", "1")))
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--host", default=fenv("HOST", "host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(fenv("ATTN_GRPC_PORT", "port", "50071")))
    p.add_argument(
        "--metrics-port", type=int, default=int(fenv("ATTN_METRICS_PORT", "metrics_port", "9471"))
    )
    p.add_argument(
        "--capacity-mb",
        type=float,
        default=float(fenv("TANDEM_ATTN_CAPACITY_MB", "capacity_mb", "1024")),
    )
    p.add_argument(
        "--dtype", choices=sorted(KV_DTYPES), default=fenv("TANDEM_ATTN_DTYPE", "dtype", "bf16")
    )
    p.add_argument(
        "--load-wait-s",
        type=float,
        default=float(fenv("TANDEM_ATTN_LOAD_WAIT_S", "load_wait_s", "5")),
    )
    p.add_argument("--threads", type=int, default=int(fenv("TANDEM_ATTN_THREADS", "threads", "1")))
    p.add_argument("--device", default=fenv("TANDEM_DEVICE", "device", "auto"))
    a = p.parse_args(argv)
    unknown = file_cfg.unknown([act.dest for act in p._actions])
    if unknown:
        p.error(f"unknown key(s) in this service's config section: {', '.join(unknown)}")

    explicit = (a.n_heads, a.n_kv_heads, a.head_dim, a.n_layers)
    model = None
    scale = a.scale
    if any(x is None for x in explicit):
        cfg = _model_shape(a.model, Path(a.cache_dir))
        model = a.model
        a.n_heads = a.n_heads or cfg.n_heads
        a.n_kv_heads = a.n_kv_heads or cfg.n_kv_heads
        a.head_dim = a.head_dim or cfg.head_dim
        a.n_layers = a.n_layers or cfg.n_layers
        scale = cfg.attn_scale if scale is None else scale
        first = a.n_layers // 2 if a.first_layer is None else int(a.first_layer)
        windows = [w for w in cfg.sliding_window[first : a.n_layers] if w is not None]
        if windows:
            p.error(f"{a.model}: sliding-window attention in layers >= {first} is not supported")
    if scale is None:
        scale = a.head_dim**-0.5
    first_layer = a.n_layers // 2 if a.first_layer is None else int(a.first_layer)
    if min(a.n_heads, a.n_kv_heads, a.head_dim, a.workers, a.threads) < 1:
        p.error("--n-heads, --n-kv-heads, --head-dim, --workers and --threads must be >= 1")
    if a.n_heads % a.n_kv_heads:
        p.error(f"--n-heads {a.n_heads} is not a multiple of --n-kv-heads {a.n_kv_heads}")
    if a.n_kv_heads % a.workers:
        p.error(
            f"{a.n_kv_heads} KV heads do not split evenly over {a.workers} workers "
            f"(head-level partitioning: use a divisor of {a.n_kv_heads})"
        )
    if not 0 <= first_layer < a.n_layers:
        p.error(f"--first-layer {first_layer} must be inside [0, {a.n_layers})")
    if a.capacity_mb <= 0 or a.load_wait_s < 0:
        p.error("--capacity-mb must be positive and --load-wait-s not negative")
    try:
        device = str(resolve_device(a.device).torch_device)
    except (DeviceUnavailable, ValueError) as exc:
        p.error(str(exc))
    if a.worker_index is not None and not 0 <= a.worker_index < a.workers:
        p.error(f"--worker-index {a.worker_index} outside [0, {a.workers})")
    settings = PoolSettings(
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        scale=float(scale),
        n_layers=a.n_layers,
        first_layer=first_layer,
        workers=a.workers,
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        capacity_mb=a.capacity_mb,
        dtype=a.dtype,
        load_wait_s=a.load_wait_s,
        threads=a.threads,
        model=model,
        device=device,
    )
    return settings, a


# -- one worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    index: int
    pid: int
    worker_id: str
    kv_head_start: int
    kv_head_end: int
    grpc_port: int
    metrics_port: int


async def serve_worker(
    settings: PoolSettings,
    index: int,
    *,
    stop: asyncio.Event | None = None,
    ready_file: Path | None = None,
    parent_pid: int | None = None,
    token: str | None = None,
    tls: TlsConfig | None = None,
) -> None:
    """Serve worker `index` until `stop` (default: SIGTERM / SIGINT) or its parent is gone."""
    start, end = settings.head_range(index)
    store = KVStore(
        settings.first_layer,
        settings.n_layers - settings.first_layer,
        start,
        end,
        settings.head_dim,
        KV_DTYPES[settings.dtype],
        int(settings.capacity_mb * 2**20),
        device=settings.device,
    )
    shape = ModelShape(settings.n_heads, settings.n_kv_heads, settings.head_dim, settings.scale)
    registry = CollectorRegistry()
    metrics = AttnMetrics(registry, worker=str(index))
    metrics.bind_store(store)
    servicer = AttentionWorkerServicer(
        store, shape, load_wait_s=settings.load_wait_s, metrics=metrics
    )

    def health():
        st = store.stats()
        return True, {
            "worker_id": servicer.worker_id,
            "index": index,
            "kv_heads": [start, end],
            "layers": [settings.first_layer, settings.n_layers],
            "sessions": st.sessions,
            "kv_bytes": st.kv_bytes,
            "capacity_bytes": st.capacity_bytes,
        }

    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    monitor = start_monitor(
        registry, health, settings.host, settings.port_of(settings.metrics_port, index)
    )
    try:
        server = await start_attention_worker(
            servicer, settings.host, settings.port_of(settings.port, index), token, tls=tls
        )
    except BaseException:
        monitor.stop()
        servicer.close()
        raise
    ready = WorkerReady(
        index, os.getpid(), servicer.worker_id, start, end, server.port, monitor.port
    )
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(ready)))
        tmp.replace(ready_file)
    print(
        f"attention worker {index} ({servicer.worker_id}): kv heads [{start}, {end}) layers "
        f"[{settings.first_layer}, {settings.n_layers}) gRPC {settings.host}:{server.port} "
        f"metrics http://{settings.host}:{monitor.port}/metrics",
        flush=True,
    )

    async def watch_parent() -> None:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("parent %d is gone: stopping", parent_pid)
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_parent())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await server.stop(settings.grace_s)
        monitor.stop()


# -- the pool (parent) ---------------------------------------------------------------------


class Pool:
    """The worker processes of one pool, started and stopped together."""

    def __init__(self, settings: PoolSettings, ready_dir: Path) -> None:
        self.settings = settings
        self.ready_dir = ready_dir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i in range(self.settings.workers):
            args = self.settings.worker_args(i, self.ready_dir / f"worker-{i}.json")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.attention_pool.main", *args],
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,  # signals reach workers through the parent only
                )
            )

    def failed(self) -> int | None:
        """Index of a worker that exited, if any."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                return i
        return None

    def wait_ready(self, timeout_s: float, stopping) -> list[WorkerReady] | None:
        deadline = time.monotonic() + timeout_s
        files = [self.ready_dir / f"worker-{i}.json" for i in range(self.settings.workers)]
        while not all(f.exists() for f in files):
            if stopping():
                return None
            bad = self.failed()
            if bad is not None:
                raise SystemExit(
                    f"attention_pool: worker {bad} exited with {self.procs[bad].returncode}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"attention_pool: workers not ready after {timeout_s:.0f} s")
            time.sleep(0.05)
        return [WorkerReady(**json.loads(f.read_text())) for f in files]

    def stop(self, grace_s: float) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run_pool(settings: PoolSettings, ready_timeout_s: float = 120.0) -> int:
    stopping: list[int] = []

    def on_signal(signum, _frame) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    with tempfile.TemporaryDirectory(prefix="tandem-attn-") as tmp:
        pool = Pool(settings, Path(tmp))
        try:
            pool.start()
            ready = pool.wait_ready(ready_timeout_s, lambda: bool(stopping))
            if ready is None:
                return 0
            h = settings.host
            print(
                f"Tandem attention pool: {settings.workers} workers, "
                f"model={settings.model or 'explicit shape'} heads={settings.n_heads} "
                f"kv_heads={settings.n_kv_heads} head_dim={settings.head_dim} layers "
                f"[{settings.first_layer}, {settings.n_layers}) kv={settings.dtype} "
                f"capacity={settings.capacity_mb:g} MiB per worker",
                flush=True,
            )
            for r in ready:
                print(
                    f"  worker {r.index}: kv heads [{r.kv_head_start}, {r.kv_head_end})  "
                    f"gRPC {h}:{r.grpc_port}  metrics http://{h}:{r.metrics_port}/metrics  "
                    f"pid {r.pid}",
                    flush=True,
                )
            addresses = ",".join(f"{h}:{r.grpc_port}" for r in ready)
            print(f"  --attention-pool {addresses}", flush=True)
            while not stopping:
                bad = pool.failed()
                if bad is not None:
                    code = pool.procs[bad].returncode
                    print(f"attention_pool: worker {bad} exited with {code}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            return 0
        finally:
            pool.stop(settings.grace_s + 5)
            for s, handler in old.items():
                signal.signal(s, handler)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    settings, args = parse_args(argv)
    # checked here too, before any worker is spawned
    tls = tls_from_env_or(lambda why: sys.exit(f"attention_pool: {why}"))
    if args.worker_index is None:
        raise SystemExit(run_pool(settings))
    torch.set_num_threads(settings.threads)
    asyncio.run(
        serve_worker(
            settings,
            args.worker_index,
            ready_file=Path(args.ready_file) if args.ready_file else None,
            parent_pid=args.parent_pid,
            token=os.environ.get("TANDEM_GRPC_TOKEN") or None,
            tls=tls,
        )
    )


if __name__ == "__main__":
    main()
