"""cloud_ctx in offload mode (Lamina): its layers run here and every attention runs in a real
attention pool (2 worker processes, KV partitioned by head, real gRPC over loopback).

- tiny llama (bf16): offloaded layer outputs and logits equal local ones within tolerance,
  through prefill, decode and a multi-row catch-up, with and without the n = 2 ping-pong;
- qwen05 (real, slow): greedy tokens through the context manager are identical to local mode;
  then a pool worker is SIGKILLed mid-generation, the pool restarts, and the session's KV is
  recomputed from the Redis log: every request is answered and the tokens stay identical.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.offload import OffloadRunner, split_micro_batches
from services.cloud_ctx.session_log import SessionLog
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.clients.pool import PoolClient, PoolShape
from tandem.launch import ServiceProcess
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import encode_hidden
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def two_free_ports() -> int:
    """A port p with p and p + 1 free (the pool's worker i listens on p + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


class Pool:
    """`python -m services.attention_pool.main --workers 2` as a real process tree."""

    def __init__(self, shape_args: list[str], log_dir: Path) -> None:
        self.port, self.metrics = two_free_ports(), two_free_ports()
        self.args = ["services.attention_pool.main", "--workers", "2", *shape_args]
        self.args += ["--port", str(self.port), "--metrics-port", str(self.metrics)]
        self.log_dir = log_dir
        self.runs = 0
        self.start()

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.port + i}" for i in range(2)]

    def start(self) -> None:
        self.runs += 1
        self.proc = ServiceProcess.start(f"pool-{self.runs}", self.args, self.log_dir)
        for a in self.addresses:
            self.proc.wait_grpc(a, timeout=120)

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid (\d+)", self.proc.log_path.read_text())]

    def stop(self) -> None:
        self.proc.stop()


def tiny_shape_args(model: DecoderModel, split: int) -> list[str]:
    cfg = model.cfg
    return [
        *("--n-heads", str(cfg.n_heads), "--n-kv-heads", str(cfg.n_kv_heads)),
        *("--head-dim", str(cfg.head_dim), "--n-layers", str(cfg.n_layers)),
        *("--first-layer", str(split), "--scale", repr(cfg.attn_scale)),
    ]


def pool_client(model: DecoderModel, pool: Pool) -> PoolClient:
    cfg = model.cfg
    shape = PoolShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, model.dtype)
    return PoolClient(pool.addresses, shape)


# ------------------------------------------------------------------ tiny model, layer level

TINY_SPLIT = 3


@pytest.fixture(scope="module")
def tiny() -> DecoderModel:
    return tiny_model("llama", torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_pool(tiny, tmp_path_factory) -> Iterator[Pool]:
    pool = Pool(tiny_shape_args(tiny, TINY_SPLIT), tmp_path_factory.mktemp("pool"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.mark.parametrize(("micro_batches", "phased"), [(1, False), (2, False), (2, True)])
def test_offloaded_layers_equal_local_ones(tiny, tiny_pool, micro_batches, phased) -> None:
    model, L = tiny, tiny.cfg.n_layers
    client = pool_client(model, tiny_pool)
    client.phased = phased  # Q then KV (Lamina's overlap) instead of one QKV message
    runner = OffloadRunner(model, TINY_SPLIT, client, micro_batches=micro_batches)
    g = torch.Generator().manual_seed(micro_batches)
    tag = f"mb{micro_batches}{'p' if phased else ''}"
    sids = [f"{tag}-a", f"{tag}-b", f"{tag}-c"]
    kvs = {s: model.new_kv(first_layer=TINY_SPLIT) for s in sids}
    pos = dict.fromkeys(sids, 0)
    d = model.cfg.hidden_size

    def step(rows_per_session: dict[str, int]) -> None:
        items = [
            (s, pos[s], torch.randn(n, d, generator=g).to(torch.bfloat16))
            for s, n in rows_per_session.items()
        ]
        local = model.run_rows([(kvs[s], p, h) for s, p, h in items], TINY_SPLIT, L)
        remote = runner.run_rows(items)
        for a, b in zip(remote, local, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=0.08, rtol=0.05)
            la, lb = model.logits(a).float(), model.logits(b).float()
            torch.testing.assert_close(la, lb, atol=0.1, rtol=0.05)
        for s, n in rows_per_session.items():
            pos[s] += n

    step({sids[0]: 5, sids[1]: 3})  # prefill: local attention, KV loaded to the pool
    for _ in range(4):  # decode: attention in the pool
        step({sids[0]: 1, sids[1]: 1})
    step({sids[0]: 3, sids[2]: 4, sids[1]: 1})  # catch-up rows + a new session in one batch
    stats = client.stats()
    assert sum(s.kv_bytes for s in stats) > 0 and {s.kv_head_start for s in stats} == {0, 1}
    # Bytes per token per layer on the wire: q + k + v out, attention output back.
    cfg = model.cfg
    per_row = 2 * (cfg.n_heads * cfg.head_dim * 2 + 2 * cfg.n_kv_heads * cfg.head_dim)
    decode_rows = (4 * 2 + 3 + 1) * (L - TINY_SPLIT)
    assert client.traffic.sent + client.traffic.received == per_row * decode_rows
    for s in sids:
        runner.release(s)
    assert sum(s.sessions for s in client.stats()) == 0
    client.close()


def test_micro_batches_balance_rows() -> None:
    rows = [("a", 0, torch.zeros(5, 2)), ("b", 0, torch.zeros(1, 2)), ("c", 0, torch.zeros(4, 2))]
    parts = split_micro_batches(rows, 2)
    assert sorted(sum(r[2].shape[0] for r in items) for _, items in parts) == [5, 5]
    assert sorted(i for index, _ in parts for i in index) == [0, 1, 2]
    assert len(split_micro_batches(rows[:1], 2)) == 1


# ------------------------------------------------------------ real model, manager level


class Edge:
    """Runs layers [0, split) locally and asks the cloud for every token (greedy)."""

    def __init__(self, model: DecoderModel, split: int, sid: str, prompt: list[int]) -> None:
        self.half = EdgeHalf(model, split)
        self.sid = sid
        self.pending = prompt
        self.tokens: list[int] = []

    def step(self, cloud: CloudContextManager) -> int:
        rows = encode_hidden(self.half.hidden(self.pending), "fp16")
        position = self.half.length - 1
        token = cloud.next_token(self.sid, position, GREEDY, rows).token
        self.tokens.append(token)
        self.pending = [token]
        return token


def manager(model, split, runner=None, log=None) -> CloudContextManager:
    n = model.cfg.n_layers
    if runner is None:
        store = SessionStore(lambda: model.new_kv(first_layer=split), StoreLimits())
    else:
        store = SessionStore(
            lambda: model.new_kv(first_layer=n, last_layer=n), StoreLimits(), on_drop=runner.release
        )
    return CloudContextManager(model, split, store, log, runner)


@pytest.mark.slow
def test_real_model_greedy_identical_and_worker_kill_recomputes_from_the_log(
    tmp_path, redis_client, redis_prefix
) -> None:
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    spec = ModelRegistry().get("qwen05")
    lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
    model, split = lm.model, lm.model.cfg.n_layers // 2
    prompt = lm.codec.encode("def fibonacci(n):")
    n_before, n_after = 6, 6

    local = manager(model, split)
    ref = Edge(model, split, "ref", prompt)
    for _ in range(n_before + n_after):
        ref.step(local)

    pool = Pool(["--model", "qwen05", "--first-layer", str(split)], tmp_path)
    try:
        runner = OffloadRunner(model, split, pool_client(model, pool), micro_batches=2)
        log = SessionLog(redis_client, replica_id="a", ttl_s=600, prefix=redis_prefix)
        cloud = manager(model, split, runner, log)
        edge = Edge(model, split, "off", prompt)
        for _ in range(n_before):
            edge.step(cloud)
        assert edge.tokens == ref.tokens[:n_before]
        assert sum(s.kv_bytes for s in runner.pool.stats()) > 0

        # Kill one worker: the pool stops (its launcher ends when a worker dies) and
        # restarts with empty KV; the next request waits for it and recomputes from the log.
        os.kill(pool.worker_pids()[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pool.proc.proc.poll() is None:
            assert time.monotonic() < deadline, "the pool did not notice its dead worker"
            time.sleep(0.1)
        pool.start()
        for _ in range(n_after):
            edge.step(cloud)  # no exception: no request lost
        assert edge.tokens == ref.tokens
        assert cloud.kv_rebuilds >= 1
        n = n_before + n_after
        print(f"attention-worker-kill drill: sent {n}, succeeded {len(edge.tokens)}, lost 0")
    finally:
        pool.stop()


def test_cloud_service_in_offload_mode_serves_the_same_tokens(tiny_pool) -> None:
    """`services.cloud_ctx.main.serve` with --attention-pool (tiny fp32 model, fp16 on the
    wire): gRPC tokens equal the full model's greedy run; /metrics shows the pool traffic
    and /health answers; a released session's KV is freed in the pool."""
    import asyncio

    import grpc

    from services.cloud_ctx.main import parse_settings, serve
    from tandem.runtime.decoder import ExitDecoder
    from tandem.runtime.generate import generate
    from tandem.transport.cloud_wire import hidden_to_proto
    from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc
    from tests.services.cloud_ctx.test_service import GREEDY as SHORT
    from tests.services.cloud_ctx.test_service import PROMPT, _get, _metric
    from tests.services.cloud_ctx.tiny_cloud import REGISTRY, SPLIT, TINY, tiny_upper_half

    model = tiny_model("llama")
    expected = list(generate(ExitDecoder(model), PROMPT, SHORT).token_ids)
    edge = EdgeHalf(model, SPLIT)
    args = ["--model", TINY.id, "--grpc-port", "0", "--metrics-port", "0", "--no-redis"]
    args += ["--attention-pool", ",".join(tiny_pool.addresses)]
    settings = parse_settings(REGISTRY, args)
    client = pool_client(tiny_model("llama", torch.bfloat16), tiny_pool)

    async def main() -> tuple[list[int], str, int, int]:
        stop = asyncio.Event()
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(settings, tiny_upper_half(), None, stop, ready.set_result))
        try:
            ep = await asyncio.wait_for(asyncio.shield(ready), 60)
            out: list[int] = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.grpc_port}") as ch:
                stub = cloud_pb2_grpc.CloudContextStub(ch)
                hidden, pos = edge.hidden(PROMPT), len(PROMPT) - 1
                for _ in range(SHORT.max_tokens):
                    req = cloud_pb2.TokenRequest(
                        session_id="svc", position=pos, hidden=hidden_to_proto(hidden)
                    )
                    token = (await stub.NextToken(req)).token_id
                    out.append(token)
                    hidden, pos = edge.hidden([token]), pos + 1
                held = sum(s.sessions for s in await asyncio.to_thread(client.stats))
                await stub.Release(cloud_pb2.ReleaseRequest(session_id="svc"))
                after = sum(s.sessions for s in await asyncio.to_thread(client.stats))
            _, text = await asyncio.to_thread(_get, ep.metrics_port, "/metrics")
            return out, text, held, after
        finally:
            stop.set()
            await task

    out, text, held, after = asyncio.run(main())
    assert out == expected
    assert held == 2 and after == 0  # one session, on both workers; freed on release
    assert _metric(text, "tandem_cloud_pool_sent_bytes_total") > 0
    assert _metric(text, "tandem_cloud_pool_attend_calls_total") > 0
    assert _metric(text, "tandem_cloud_kv_rebuilds_total") == 0
    assert _metric(text, "tandem_cloud_session_bytes") == 0  # no KV on the compute side
    client.close()
