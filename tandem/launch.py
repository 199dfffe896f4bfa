"""Start Tandem services as child processes and wait until they serve (benchmarks, tests and
local clusters use it).

`ServiceProcess.start(name, ["services.edge_node.main", "--model", "smollm2", ...])` runs
`python -m ...` with its output in a log file, `wait_grpc(target)` / `wait_http(url)` block
until the service answers (failing early, with the log's tail, if it exits), and `stop()`
sends SIGTERM, then SIGKILL after a grace period. `kill()` is the crash drill: SIGKILL at once.
`ServiceProcess.spawn` runs any command the same way (the cluster's redis-server).

Children die with their parent: each one asks the kernel for SIGTERM when the thread that
started it goes away (Linux's parent-death signal, PR_SET_PDEATHSIG), so a launcher killed
with SIGKILL leaves no services behind. The signal follows the starting *thread*: start
children from a thread that outlives them (the main thread does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def parent_death_signal(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when this thread exits (Linux; None
    elsewhere). If the parent is already gone by the time the child runs it (a race with a
    SIGKILL), the child sends `sig` to itself."""
    if _LIBC is None:
        return None
    parent, prctl = os.getpid(), _LIBC.prctl  # looked up before the fork

    def set_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return set_signal


def _preexec(steps: Sequence[Callable[[], None] | None]) -> Callable[[], None] | None:
    todo = [s for s in steps if s is not None]
    if not todo:
        return None

    def run() -> None:
        for step in todo:
            step()

    return run


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
        process_group: int | None = None,
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
        return cls.spawn(
            name,
            [sys.executable, "-m", *args],
            log_dir,
            base,
            cores=cores,
            process_group=process_group,
        )

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cores: set[int] | None = None,
        process_group: int | None = None,
    ) -> ServiceProcess:
        """Run `argv` from the repository root with its output in `log_dir/<name>.log` and
        stdin closed; it gets SIGTERM when the calling thread exits (`parent_death_signal`).
        By default it leads a session of its own (a Ctrl-C in the terminal reaches the
        parent only); with `process_group` it joins that process group of this session
        instead (0: a new group, led by the child), so one `killpg` reaches a whole cluster.
        `env` is the child's whole environment (default: this one)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=process_group is None,
                process_group=process_group,
                preexec_fn=_preexec([parent_death_signal(), pin]),
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
