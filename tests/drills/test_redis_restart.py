"""Failure drill: Redis (append-only file on) restarts in the middle of sessions. No session is
lost: the cloud keeps answering after Redis is back, and a cloud replica that then restarts
rebuilds every session from what Redis kept, with the same tokens as an uninterrupted run.

A real redis-server of its own (its AOF in a temp dir), the cloud context manager on the tiny
llama, three sessions."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from services.cloud_ctx.session_log import LogUnavailable
from tandem.launch import free_port
from tests.services.cloud_ctx.test_rebuild import Edge, _cloud, _uninterrupted
from tests.tiny import tiny_model


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
            + ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def restart(self) -> None:
        """SHUTDOWN (the AOF is flushed) and start again on the same port and files."""
        try:
            redis.Redis(port=self.port).shutdown()
        except redis.ConnectionError:
            pass  # it closes the connection while going down
        assert self.proc is not None
        self.proc.wait(10)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_redis_restart_loses_no_session(tmp_path: Path) -> None:
    model = tiny_model("llama")
    expected = _uninterrupted(model)
    server = RedisServer(tmp_path)
    try:
        client = redis.Redis(port=server.port, socket_timeout=5)
        first = _cloud(model, client, "drill:", "a")
        edges = [Edge(model, sid=f"s{i}") for i in range(3)]
        for e in edges:
            e.start(first)
            for _ in range(3):
                e.step(first)
        server.restart()
        answered = lost = 0
        for e in edges:  # the same replica goes on once Redis answers again
            for _ in range(2):
                for _attempt in range(20):  # the edge retries UNAVAILABLE, bounded
                    try:
                        e.step(first)
                        answered += 1
                        break
                    except LogUnavailable:
                        time.sleep(0.1)
                else:
                    lost += 1
        # the cloud replica restarts too: only Redis remembers; every session is rebuilt
        second = _cloud(model, redis.Redis(port=server.port), "drill:", "b")
        for e in edges:
            while len(e.tokens) < len(expected):
                e.step(second)
                answered += 1
        print(f"redis-restart drill: sent {answered + lost}, succeeded {answered}, lost {lost}")
        assert lost == 0
        assert all(e.tokens == expected for e in edges)
        assert second.rebuilds == len(edges)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _needs_redis_server() -> None:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        pytest.fail("redis-server is not installed (make setup)")
