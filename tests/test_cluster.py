"""`python -m tandem.cluster` as `make run` starts it, on a small cluster file (Redis, one
real smollm2 edge node, an attention pool with two workers, the router without a gate):
health-gated startup, each service reading its own section, a request through the router,
Ctrl-C stopping every process it started. The full cluster (configs/cluster.yaml) runs the
same code with more sections. And however the launcher is killed (SIGTERM then SIGKILL, or
SIGKILL at once), none of its children survives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tandem.cluster import plan
from tandem.config_file import ConfigFileError, Settings, load_yaml
from tandem.launch import ROOT, free_port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def small_cluster(tmp_path: Path) -> tuple[Path, dict]:
    redis_port, edge_http, edge_grpc = free_port(), free_port(), free_port()
    router_port, pool_port = free_port(), free_port()
    raw = {
        "redis": {"port": redis_port},
        "attention_pool": {
            **{"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "n_layers": 6, "first_layer": 3},
            **{"workers": 1, "port": pool_port, "metrics_port": 0, "capacity_mb": 16},
        },
        "edges": {"smollm2": {"model": "smollm2", "port": edge_http, "grpc_port": edge_grpc}},
        "router": {
            "port": router_port,
            "health": {"interval_s": 0.3, "timeout_s": 1.0},
            "experts": [
                {
                    "id": "smollm2",
                    "kind": "edge",
                    "device": "cpu",
                    "replicas": [f"127.0.0.1:{edge_grpc}"],
                }
            ],
        },
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_sections_and_precedence(tmp_path: Path) -> None:
    path, raw = small_cluster(tmp_path)
    assert [s.name for s in plan(load_yaml(path))] == ["attention_pool", "smollm2", "router"]
    argv = ["--config", str(path), "--name", "smollm2"]
    s = Settings.from_argv(argv, "edge", env={})
    assert s.get("PORT", "port", 8000) == raw["edges"]["smollm2"]["port"]  # the file
    assert Settings.from_argv(argv, "edge", env={"PORT": "9"}).get("PORT", "port") == "9"  # env
    assert s.get("TANDEM_TAU", "tau", 0.9) == 0.9  # built-in default
    with pytest.raises(ConfigFileError, match="no edge named 'nope'"):
        Settings.from_argv(["--config", str(path), "--name", "nope"], "edge", env={})
    from services.edge_node.main import parse_settings
    from tandem.models.registry import ModelRegistry

    assert parse_settings(ModelRegistry(), argv).grpc_port == raw["edges"]["smollm2"]["grpc_port"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"edges": {"x": {"model": "smollm2", "colour": 1}}}))
    with pytest.raises(SystemExit):
        parse_settings(ModelRegistry(), ["--config", str(bad), "--name", "x"])


@pytest.mark.slow
def test_cluster_starts_serves_and_stops_everything(tmp_path: Path) -> None:
    path, raw = small_cluster(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cluster", "--config", str(path), "--no-demo"]
        + ["--log-dir", str(tmp_path / "logs")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")},
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"cluster ready: pids ([\d ]+)", line):
                pids = [int(p) for p in m.group(1).split()]
                break
            assert time.monotonic() < deadline, "cluster did not start:\n" + "".join(lines)
        assert pids, "cluster exited early:\n" + "".join(lines)
        base = f"http://127.0.0.1:{raw['router']['port']}"
        assert httpx.get(f"{base}/ready").status_code == 200
        reply = httpx.post(
            f"{base}/v1/completions",
            json={"model": "smollm2", "prompt": "The sky is", "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        redis_up = subprocess.run(
            ["redis-cli", "-p", str(raw["redis"]["port"]), "ping"], capture_output=True, text=True
        )
        assert redis_up.stdout.strip() == "PONG"
        proc.send_signal(signal.SIGINT)  # Ctrl-C ...
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # ... twice (or a wrapper forwarding it): still clean
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines)
        assert "cluster: stopped" in rest
        # every service and its children are gone, and so is the Redis it started
        pool_log = (tmp_path / "logs" / "attention_pool.log").read_text()
        pool_workers = [int(p) for p in re.findall(r"pid (\d+)", pool_log)]
        assert pool_workers, pool_log
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids + pool_workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids + pool_workers if alive(p)]
        down = subprocess.run(
            ["redis-cli", "-p", str(raw["redis"]["port"]), "ping"], capture_output=True, text=True
        )
        assert down.stdout.strip() != "PONG"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# -- no orphans ------------------------------------------------------------------------------


def redis_and_pool(tmp_path: Path) -> tuple[Path, int]:
    """The cheapest real cluster: Redis and a one-worker attention pool with a tiny explicit
    shape (no model is read)."""
    redis_port = free_port()
    raw = {
        "redis": {"port": redis_port},
        "attention_pool": {
            **{"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "n_layers": 6, "first_layer": 3},
            **{"workers": 1, "port": free_port(), "metrics_port": 0, "capacity_mb": 16},
        },
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, redis_port


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("term_first", [True, False], ids=["sigterm-then-sigkill", "sigkill"])
def test_a_killed_launcher_leaves_no_orphans(tmp_path: Path, term_first: bool) -> None:
    path, redis_port = redis_and_pool(tmp_path)
    logs = tmp_path / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "cluster", "--config", str(path), "--no-demo"]
        + ["--log-dir", str(logs)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")},
        start_new_session=True,
    )
    lines: list[str] = []
    children: list[int] = []
    group = None
    try:
        deadline = time.monotonic() + 45
        for line in launcher.stdout:
            lines.append(line)
            if m := re.match(r"cluster ready: pids ([\d ]+) \(process group (\d+)\)", line):
                children, group = [int(p) for p in m.group(1).split()], int(m.group(2))
                break
            assert time.monotonic() < deadline, "cluster did not start:\n" + "".join(lines)
        assert children, "cluster exited early:\n" + "".join(lines)
        assert group == children[0]  # Redis leads the children's process group
        assert all(os.getpgid(p) == group for p in children)
        pool_log = (logs / "attention_pool.log").read_text()
        workers = [int(p) for p in re.findall(r"pid (\d+)", pool_log)]
        assert len(workers) == 1
        everything = children + workers
        assert all(alive(p) for p in everything)
        assert (
            subprocess.run(
                ["redis-cli", "-p", str(redis_port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            == "PONG"
        )

        if term_first:
            launcher.send_signal(signal.SIGTERM)
            time.sleep(2)
        launcher.kill()
        launcher.wait(10)

        left = wait_gone(everything, timeout_s=20)
        assert not left, f"orphans: {left}\n" + "".join(lines)
        down = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "ping"], capture_output=True, text=True
        )
        assert down.stdout.strip() != "PONG"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in children + [p for p in (group,) if p]:
            try:  # a failed run must not leave them behind either
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
