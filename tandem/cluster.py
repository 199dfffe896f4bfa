"""`tandem cluster` (`make run`): the whole Tandem cluster on this machine, from one YAML file.

    tandem cluster --config configs/cluster.yaml      # or: python -m tandem.cluster ...

Starts, in dependency order and each gated on its health: Redis (a redis-server child, data in
`.run/redis/<port>`), the attention pool, cloud_ctx, the edge nodes (all of `edges:`), then the
router; sends one demo request through the router; then waits. Every service gets
`--config <file> --name <name>` and reads its own section (environment variables still override
it). Logs go to `.run/logs/<service>.log`. Ctrl-C (or SIGTERM) stops everything in reverse
order (SIGTERM, then SIGKILL after a grace period), Redis last; a service that dies takes the
cluster down with it (exit 1, the tail of its log printed). Sections that are absent are not
started, so a smaller file runs a smaller cluster.

No orphans, however the launcher ends: every child (Redis included) gets SIGTERM from the
kernel when the launcher dies (`tandem.launch.parent_death_signal`), even by SIGKILL, and
the pool's workers follow their pool. All children share one process group, which the
launcher owns and sweeps with SIGKILL after stopping them; its id is printed at start
(`kill -- -<pgid>` reaches the whole cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tandem.config_file import ConfigFileError, load_yaml
from tandem.launch import ROOT, ServiceProcess

LOG_DIR = ROOT / ".run" / "logs"
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ServiceSpec:
    """One service to start: its module, and how to tell it is up."""

    name: str
    module: str
    grpc_targets: tuple[str, ...] = ()
    http_ready: str | None = None


def plan(raw: Mapping[str, Any]) -> list[ServiceSpec]:
    """The services of a cluster file, in start order."""
    out: list[ServiceSpec] = []
    pool = raw.get("attention_pool")
    if pool is not None:
        port, n = int(pool.get("port", 50071)), int(pool.get("workers", 1))
        targets = tuple(f"127.0.0.1:{port + i}" for i in range(n))
        out.append(ServiceSpec("attention_pool", "services.attention_pool.main", targets))
    cloud = raw.get("cloud_ctx")
    if cloud is not None:
        target = f"127.0.0.1:{int(cloud.get('grpc_port', 50061))}"
        out.append(ServiceSpec("cloud_ctx", "services.cloud_ctx.main", (target,)))
    for name, edge in (raw.get("edges") or {}).items():
        target = f"127.0.0.1:{int(edge.get('grpc_port', 50051))}"
        out.append(ServiceSpec(name, "services.edge_node.main", (target,)))
    router = raw.get("router")
    if router is not None:
        url = f"http://127.0.0.1:{int(router.get('port', 8080))}/ready"
        out.append(ServiceSpec("router", "services.router.main", http_ready=url))
    return out


class Cluster:
    def __init__(self, config: Path, log_dir: Path = LOG_DIR, say: Callable[[str], None] = print):
        self.config = config.resolve()
        self.raw = load_yaml(self.config)
        self.log_dir = log_dir
        self.say = say
        self.running: list[ServiceProcess] = []
        self.pgid: int | None = None  # the children's process group (the first child's pid)

    # -- start / stop ------------------------------------------------------------------

    def start(self) -> None:
        redis = self.raw.get("redis")
        if redis is not None:
            port = int(redis.get("port", 6390))
            if redis_answers(port):  # someone else's: use it, leave it running
                self.say(f"  redis           127.0.0.1:{port} (already running, left as is)")
            else:
                proc = self._spawn("redis", redis_argv(port))
                wait_redis(proc, port, timeout=30)
                self.say(f"  redis           127.0.0.1:{port} (pid {proc.proc.pid})")
        for spec in plan(self.raw):
            args = [spec.module, "--config", str(self.config), "--name", spec.name]
            # The user's environment passes through (it overrides the file, as documented);
            # one torch thread per service unless said otherwise: they share the cores.
            env = {"TANDEM_THREADS": os.environ.get("TANDEM_THREADS", "1")}
            env.update({k: "" for k in ("TANDEM_CONFIG", "TANDEM_SERVICE")})
            proc = self._start(spec.name, args, env)
            t0 = time.monotonic()
            for target in spec.grpc_targets:
                proc.wait_grpc(target, timeout=READY_TIMEOUT_S)
            if spec.http_ready:
                proc.wait_http(spec.http_ready, timeout=READY_TIMEOUT_S)
            where = ", ".join(spec.grpc_targets) or spec.http_ready or ""
            self.say(
                f"  {spec.name:<15} ready in {time.monotonic() - t0:5.1f} s  {where}  "
                f"(pid {proc.proc.pid}, log {proc.log_path})"
            )

    def _spawn(self, name: str, argv: list[str]) -> ServiceProcess:
        proc = ServiceProcess.spawn(name, argv, self.log_dir, process_group=self.pgid or 0)
        return self._adopt(proc)

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> ServiceProcess:
        proc = ServiceProcess.start(
            name, args, self.log_dir, env, inherit_tandem_env=True, process_group=self.pgid or 0
        )
        return self._adopt(proc)

    def _adopt(self, proc: ServiceProcess) -> ServiceProcess:
        if self.pgid is None:
            self.pgid = proc.proc.pid  # the first child leads the group (process_group=0)
        self.running.append(proc)
        return proc

    def stop(self, grace_s: float = 20.0) -> None:
        for proc in reversed(self.running):
            proc.stop(grace_s)
        self.running.clear()
        if self.pgid is not None:  # whatever is left in the group (nothing, normally)
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.pgid = None

    # -- while running -----------------------------------------------------------------

    def failed(self) -> ServiceProcess | None:
        for proc in self.running:
            if proc.proc.poll() is not None:
                return proc
        return None

    def pids(self) -> list[int]:
        return [proc.proc.pid for proc in self.running]

    def demo(self) -> None:
        router = self.raw.get("router")
        if router is None:
            return
        url = f"http://127.0.0.1:{int(router.get('port', 8080))}/v1/chat/completions"
        body = {
            "model": "auto",
            "messages": [
                {"role": "user", "content": "Write a Python function that adds two numbers."}
            ],
            "max_tokens": 24,
            "temperature": 0,
        }
        self.say(f"demo: POST {url} (model auto)")
        try:
            resp = httpx.post(url, json=body, timeout=300)
        except httpx.HTTPError as exc:
            self.say(f"demo request failed: {exc}")
            return
        if resp.status_code != 200:
            self.say(f"demo request answered {resp.status_code}: {resp.text[:300]}")
            return
        data = resp.json()
        route = data["usage"].get("tandem", {}).get("router", {})
        self.say("  answer: " + json.dumps(data["choices"][0]["message"]["content"])[:300])
        self.say(
            f"  served by {route.get('answered_by')} (S = {route.get('subset')}), "
            f"{route.get('latency_ms', 0):.0f} ms measured / "
            f"{route.get('latency_predicted_ms', 0):.0f} ms predicted, "
            f"~{route.get('energy_j', 0):.3g} J modelled"
        )


def redis_argv(port: int) -> list[str]:
    """A foreground redis-server on loopback (so it is our child, and dies with us): append-only,
    no snapshots, its data in .run/redis/<port> (one directory per port)."""
    data = ROOT / ".run" / "redis" / str(port)
    data.mkdir(parents=True, exist_ok=True)
    return [
        "redis-server",
        *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)),
        *("--appendonly", "yes", "--save", ""),
    ]


def redis_answers(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on 127.0.0.1:`port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_redis(proc: ServiceProcess, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not redis_answers(port):
        proc.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis: no answer on port {port} after {timeout:.0f} s")
        time.sleep(0.05)


class _Interrupt:
    """SIGINT / SIGTERM: the first one interrupts (the cluster then stops everything); any
    further one (a second Ctrl-C, a wrapper forwarding the same signal) is ignored, so the
    shutdown itself is never cut short and leaves no orphans."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, _frame: object) -> None:
        if self.fired:
            return
        self.fired = True
        raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the whole Tandem cluster locally")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo request")
    ap.add_argument("--log-dir", type=Path, default=LOG_DIR)
    args = ap.parse_args(argv)
    try:
        cluster = Cluster(args.config, args.log_dir)
    except ConfigFileError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    interrupt = _Interrupt()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: stop everything, then exit
    print(f"Tandem cluster from {args.config} (logs in {args.log_dir})", flush=True)
    code = 0
    try:
        cluster.start()
        pids = " ".join(map(str, cluster.pids()))
        print(f"cluster ready: pids {pids} (process group {cluster.pgid})", flush=True)
        if not args.no_demo:
            cluster.demo()
        print("Ctrl-C stops the cluster.", flush=True)
        while (dead := cluster.failed()) is None:
            time.sleep(0.5)
        tail = dead.log_path.read_text()[-2000:]
        print(f"cluster: {dead.name} exited ({dead.proc.returncode}):\n{tail}", flush=True)
        code = 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        print(f"cluster: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        interrupt.fired = True  # from here on every signal is ignored
        print("cluster: stopping", flush=True)
        cluster.stop()
        print("cluster: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
