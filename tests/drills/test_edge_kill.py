"""Failure drill: an edge node is SIGKILLed while a bounded load runs through the router.

Two real smollm2 edge processes serve the expert `smollm2` as two replicas behind a real
router. Four clients send requests for a fixed time, every second one streamed; one replica
is killed a few seconds in. Every request must end in a known way: non-streaming requests
succeed (the router fails over, retrying an answer that broke off half-way on the other
replica); a stream that was cut mid-way ends with an error event and `[DONE]`, never a hang.
Lost must be 0."""

from __future__ import annotations

import threading
import time

import pytest

from loadtest.drill_client import run_load
from services.router.config import parse_router_config
from services.router.main import build
from tandem.launch import ServiceProcess, free_port
from tests.api.live_server import live_server

pytestmark = pytest.mark.slow


def test_kill_an_edge_node_during_load(tmp_path) -> None:
    ports = [(free_port(), free_port()) for _ in range(2)]
    edges = [
        ServiceProcess.start(
            f"edge-{i}",
            ["services.edge_node.main", "--model", "smollm2"]
            + ["--port", str(http), "--grpc-port", str(grpc)],
            tmp_path,
            {"TANDEM_THREADS": "1"},
        )
        for i, (http, grpc) in enumerate(ports)
    ]
    try:
        for e, (_, grpc) in zip(edges, ports, strict=True):
            e.wait_grpc(f"127.0.0.1:{grpc}")
        raw = {
            "health": {"interval_s": 0.3, "timeout_s": 1.0, "failure_threshold": 1},
            "gate": None,
            "experts": [
                {
                    "id": "smollm2",
                    "kind": "edge",
                    "device": "cpu",
                    "replicas": [f"127.0.0.1:{g}" for _, g in ports],
                }
            ],
        }
        with live_server(build(parse_router_config(raw, {})), lifespan="on") as base:
            killer = threading.Timer(5.0, edges[0].kill)
            killer.start()
            t0 = time.monotonic()
            tally = run_load(base, "smollm2", seconds=15, clients=4, max_tokens=24)
            killer.join()
            print(f"edge-kill drill ({time.monotonic() - t0:.0f} s): {tally.row()}", tally.by_kind)
            assert edges[0].proc.poll() is not None, "the replica was not killed"
            assert tally.counts["lost"] == 0, tally.examples
            assert tally.by_kind["plain"]["succeeded"] == sum(tally.by_kind["plain"].values())
            assert tally.counts["sent"] >= 8
            assert (
                tally.counts["succeeded"] + tally.counts["failed_cleanly"] == tally.counts["sent"]
            )
    finally:
        for e in edges:
            e.stop()
