"""Start Tandem services as child processes and wait until they serve (benchmarks, tests and
local clusters use it).

`ServiceProcess.start(name, ["services.edge_node.main", "--model", "smollm2", ...])` runs
`python -m ...` with its output in a log file, `wait_grpc(target)` / `wait_http(url)` block
until the service answers (failing early, with the log's tail, if it exits), and `stop()`
sends SIGTERM, then SIGKILL after a grace period. `kill()` is the crash drill: SIGKILL at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Settings of the machine rather than of one service, passed to every child: the model
# cache, and whether to compile the decode step (tests turn it off for speed).
MACHINE_ENV = ("TANDEM_CACHE", "TANDEM_COMPILE")


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(
        cls,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        inherit_tandem_env: bool = False,
        cores: set[int] | None = None,
    ) -> ServiceProcess:
        """`python -m <args>` from the repository root. The child gets this environment minus
        inherited TANDEM_* settings (the flags and `env` say everything; with
        `inherit_tandem_env` they pass through) other than the machine-wide ones
        (`MACHINE_ENV`), plus `env`; with `cores`, it is pinned to those CPU cores."""
        base = {
            k: v
            for k, v in os.environ.items()
            if inherit_tandem_env or k in MACHINE_ENV or "TANDEM_" not in k
        }
        base.update(PYTHONUNBUFFERED="1")
        base.update(env or {})
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=base,
                start_new_session=True,  # Ctrl-C in a terminal reaches the parent only
                preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
            )
        return cls(name, proc, log_path)

    def check(self) -> None:
        """Raise (with the log's tail) if the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def wait_grpc(self, target: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            with grpc.insecure_channel(target) as channel:
                ready = grpc.channel_ready_future(channel)
                try:
                    ready.result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    ready.cancel()  # stop its polling thread before the channel closes
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no gRPC at {target} after {timeout:.0f} s")

    def wait_http(self, url: str, timeout: float = 180.0) -> None:
        """Until GET `url` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {url} not 200 after {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
