"""Kill -9 the cloud mid-generation: a new cloud process (same Redis, new replica id)
continues the session from the log, without the edge uploading anything again, and the
greedy tokens equal an uninterrupted run. The position uploaded (and acknowledged) just
before the kill is asked for without its hidden state: it must have been logged.

Runs the real processes: `tests.services.cloud_ctx.tiny_cloud` (tiny model, fast) and
`services.cloud_ctx.main --model smollm2` (real model, slow)."""

from __future__ import annotations

import signal

import grpc
import pytest
import torch

from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import SamplingParams
from tandem.transport.cloud_wire import hidden_to_proto
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from tests.services.cloud_ctx.cloud_process import ROOT, CloudProcess
from tests.services.cloud_ctx.edge_half import EdgeHalf


def _edge_run(
    model: DecoderModel,
    split: int,
    prompt: list[int],
    n_tokens: int,
    kill_after: int,
    start_cloud,
) -> tuple[list[int], str]:
    """Generate n_tokens with every token from the cloud; SIGKILL the first cloud after
    kill_after tokens and an acknowledged upload of the next position."""
    edge = EdgeHalf(model, split)
    out: list[int] = []
    clouds = [start_cloud("one")]
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{clouds[0].port}")
        stub = cloud_pb2_grpc.CloudContextStub(ch)
        h = edge.hidden(prompt)
        up = cloud_pb2.UploadRequest(session_id="s", start_pos=0, hidden=hidden_to_proto(h[:-1]))
        assert stub.Upload(iter([up]), timeout=60).positions == len(prompt) - 1
        pos, hidden = len(prompt) - 1, h[-1:]
        while len(out) < n_tokens:
            if len(out) == kill_after:
                # acknowledged upload of the newest position, then the cloud dies
                up = cloud_pb2.UploadRequest(
                    session_id="s", start_pos=pos, hidden=hidden_to_proto(hidden)
                )
                assert stub.Upload(iter([up]), timeout=60).positions == pos + 1
                clouds[0].kill()
                ch.close()
                clouds.append(start_cloud("two"))
                ch = grpc.insecure_channel(f"127.0.0.1:{clouds[1].port}")
                stub = cloud_pb2_grpc.CloudContextStub(ch)
                req = cloud_pb2.TokenRequest(session_id="s", position=pos)  # no hidden
            else:
                req = cloud_pb2.TokenRequest(
                    session_id="s", position=pos, hidden=hidden_to_proto(hidden)
                )
            reply = stub.NextToken(req, timeout=60)
            if len(out) == kill_after:
                assert reply.catch_up_rows == pos + 1  # rebuilt: one batched catch-up
            out.append(reply.token_id)
            pos += 1
            hidden = edge.hidden([reply.token_id])
        ch.close()
        clouds[-1].proc.send_signal(signal.SIGTERM)  # graceful stop
        assert clouds[-1].proc.wait(30) == 0, "".join(clouds[-1].output)
        return out, "".join(clouds[-1].output)
    finally:
        for c in clouds:
            c.kill()


def _redis_args(redis_url: str, prefix: str, replica: str) -> list[str]:
    return [
        "--grpc-port",
        "0",
        "--redis-url",
        redis_url,
        "--redis-prefix",
        prefix,
        "--replica-id",
        replica,
    ]


def test_kill_tiny_cloud_and_continue(redis_client, redis_url, redis_prefix):
    from tests.services.cloud_ctx.tiny_cloud import SPLIT
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = [5, 9, 17, 33, 65, 129]
    expected = list(generate(ExitDecoder(model), prompt, params).token_ids)

    def start(replica: str) -> CloudProcess:
        return CloudProcess(
            "tests.services.cloud_ctx.tiny_cloud", _redis_args(redis_url, redis_prefix, replica)
        )

    out, log = _edge_run(model, SPLIT, prompt, params.max_tokens, 3, start)
    assert out == expected
    assert "rebuilt session 's' from the log" in log
    owner = redis_client.hget(f"{redis_prefix}session:{{s}}", "owner")
    assert owner == b"two"


@pytest.mark.slow
@torch.inference_mode()
def test_kill_smollm2_cloud_and_continue(redis_client, redis_url, redis_prefix):
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    lm = load_model(
        ModelRegistry().get("smollm2"),
        LoadOptions(quant="bf16", exits=False, cache_dir=ROOT / "model_cache"),
    )
    split = 15
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = lm.codec.encode("def fibonacci(n):")
    expected = list(generate(ExitDecoder(lm.model), prompt, params).token_ids)

    def start(replica: str) -> CloudProcess:
        args = ["--model", "smollm2", "--split", str(split), "--quant", "bf16"]
        args += ["--cache-dir", str(ROOT / "model_cache")]
        return CloudProcess(
            "services.cloud_ctx.main", args + _redis_args(redis_url, redis_prefix, replica)
        )

    out, log = _edge_run(lm.model, split, prompt, params.max_tokens, 5, start)
    assert out == expected
    assert "rebuilt session 's' from the log" in log
