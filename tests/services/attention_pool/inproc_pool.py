"""An attention pool in this process for tests: N workers (KV heads split evenly) served
over real gRPC on 127.0.0.1 from their own event-loop thread, so synchronous code (a
PoolClient, a cloud context manager's model thread) can call them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from services.attention_pool.kv_store import KVStore
from services.attention_pool.worker import (
    AttentionWorkerServicer,
    ModelShape,
    RunningAttentionWorker,
    start_attention_worker,
)


@dataclass(frozen=True)
class PoolSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    first_layer: int
    n_layers: int
    dtype: torch.dtype = torch.bfloat16
    workers: int = 2
    load_wait_s: float = 2.0
    capacity_bytes: int = 1 << 26


@dataclass
class InProcPool:
    addresses: list[str]
    servicers: list[AttentionWorkerServicer]


@contextmanager
def inproc_pool(spec: PoolSpec) -> Iterator[InProcPool]:
    if spec.n_kv_heads % spec.workers:
        raise ValueError("the workers must split the KV heads evenly")
    per = spec.n_kv_heads // spec.workers
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> list[RunningAttentionWorker]:
        out = []
        for i in range(spec.workers):
            store = KVStore(
                spec.first_layer,
                spec.n_layers,
                i * per,
                (i + 1) * per,
                spec.head_dim,
                spec.dtype,
                spec.capacity_bytes,
            )
            shape = ModelShape(spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.scale)
            svc = AttentionWorkerServicer(store, shape, load_wait_s=spec.load_wait_s)
            out.append(await start_attention_worker(svc))
        return out

    running = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield InProcPool([f"127.0.0.1:{w.port}" for w in running], [w.servicer for w in running])
    finally:
        for w in running:
            asyncio.run_coroutine_threadsafe(w.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
