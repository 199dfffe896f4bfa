"""The cloud context manager over real gRPC on 127.0.0.1, tiny model: split inference
equals full-model greedy; errors map to status codes the edge can act on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.grpc_server import start_cloud_server
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tandem.transport.cloud_wire import EXPECTED_POSITION_KEY, hidden_to_proto
from tandem_proto.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from tests.services.cloud_ctx.edge_half import EdgeHalf
from tests.tiny import tiny_model

SPLIT = 3
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 33, 65, 129]


def test_split_generation_over_grpc_and_errors():
    model = tiny_model("llama")
    expected = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    manager = CloudContextManager(
        model, SPLIT, SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    )

    async def main():
        server = await start_cloud_server(manager)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = cloud_pb2_grpc.CloudContextStub(ch)
                edge = EdgeHalf(model, SPLIT)
                h = edge.hidden(PROMPT)
                up = await stub.Upload(
                    iter(
                        [
                            cloud_pb2.UploadRequest(
                                session_id="s", start_pos=0, hidden=hidden_to_proto(h[:-1])
                            )
                        ]
                    )
                )
                assert up.positions == len(PROMPT) - 1
                out, pos, hidden = [], len(PROMPT) - 1, h[-1:]
                while len(out) < GREEDY.max_tokens:
                    reply = await stub.NextToken(
                        cloud_pb2.TokenRequest(
                            session_id="s", position=pos, hidden=hidden_to_proto(hidden)
                        )
                    )
                    out.append(reply.token_id)
                    pos += 1
                    hidden = edge.hidden([reply.token_id])
                with pytest.raises(grpc.aio.AioRpcError) as gap:
                    await stub.NextToken(cloud_pb2.TokenRequest(session_id="s", position=2))
                assert gap.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                meta = dict(gap.value.trailing_metadata() or ())
                assert meta[EXPECTED_POSITION_KEY] == str(pos - 1)
                assert (await stub.Release(cloud_pb2.ReleaseRequest(session_id="s"))).released
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await stub.NextToken(cloud_pb2.TokenRequest(session_id="s", position=0))
                assert gone.value.code() == grpc.StatusCode.NOT_FOUND
                bad = cloud_pb2.HiddenStates(encoding="fp16", n_tokens=1, hidden_size=7, data=b"")
                with pytest.raises(grpc.aio.AioRpcError) as invalid:
                    await stub.NextToken(
                        cloud_pb2.TokenRequest(session_id="t", position=0, hidden=bad)
                    )
                assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                return out
        finally:
            await server.stop()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == expected


def test_concurrent_sessions_are_batched_and_stay_exact():
    """Four edges ask at once: requests that queue while the model is busy are answered
    by one batched forward (the batch-size histogram sees batches > 1), and every
    session still gets the full model's greedy tokens."""
    from prometheus_client import CollectorRegistry

    from services.cloud_ctx.metrics import CloudMetrics

    model = tiny_model("llama")
    prompts = [PROMPT, PROMPT[:4], [3, 1, 4, 1, 5, 9, 2, 6], [42] * 5]
    expected = [list(generate(ExitDecoder(model), p, GREEDY).token_ids) for p in prompts]
    manager = CloudContextManager(
        model, SPLIT, SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    )
    registry = CollectorRegistry()
    metrics = CloudMetrics(registry, model_name="tiny")

    async def edge(stub, sid: str, prompt: list[int]) -> list[int]:
        half, out, ids = EdgeHalf(model, SPLIT), [], prompt
        while len(out) < GREEDY.max_tokens:
            h = half.hidden(ids)
            req = cloud_pb2.TokenRequest(
                session_id=sid, position=half.length - 1, hidden=hidden_to_proto(h)
            )
            out.append((await stub.NextToken(req)).token_id)
            ids = [out[-1]]
        return out

    async def main():
        server = await start_cloud_server(manager, metrics=metrics)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = cloud_pb2_grpc.CloudContextStub(ch)
                return await asyncio.gather(
                    *(edge(stub, f"e{i}", p) for i, p in enumerate(prompts))
                )
        finally:
            await server.stop()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == expected
    count = registry.get_sample_value("tandem_cloud_token_batch_size_count", {"model": "tiny"})
    total = registry.get_sample_value("tandem_cloud_token_batch_size_sum", {"model": "tiny"})
    assert total == len(prompts) * GREEDY.max_tokens
    assert count < total  # some forwards answered several sessions


def test_one_message_answers_each_session_in_its_place():
    """NextTokens: the token requests of several sessions in one message share a batch;
    each gets the token NextToken would give it, a failing one its own status."""
    model = tiny_model("llama")
    expected = list(generate(ExitDecoder(model), PROMPT, GREEDY).token_ids)
    manager = CloudContextManager(
        model, SPLIT, SessionStore(lambda: model.new_kv(first_layer=SPLIT), StoreLimits())
    )
    sids = ["a", "b", "c"]

    async def main():
        server = await start_cloud_server(manager)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = cloud_pb2_grpc.CloudContextStub(ch)
                edges = {sid: EdgeHalf(model, SPLIT) for sid in sids}
                hidden = {sid: e.hidden(PROMPT) for sid, e in edges.items()}
                outs: dict[str, list[int]] = {sid: [] for sid in sids}
                pos = len(PROMPT) - 1
                while len(outs["a"]) < GREEDY.max_tokens:
                    batch = cloud_pb2.TokenBatch(
                        requests=[
                            cloud_pb2.TokenRequest(
                                session_id=sid, position=pos, hidden=hidden_to_proto(hidden[sid])
                            )
                            for sid in sids
                        ]
                    )
                    reply = await stub.NextTokens(batch)
                    assert len(reply.results) == len(sids)
                    for sid, r in zip(sids, reply.results, strict=True):
                        assert not r.HasField("error")
                        outs[sid].append(r.reply.token_id)
                        hidden[sid] = edges[sid].hidden([r.reply.token_id])
                    pos += 1
                # a gap in one request fails only that one, with where the session ends
                reply = await stub.NextTokens(
                    cloud_pb2.TokenBatch(
                        requests=[
                            cloud_pb2.TokenRequest(session_id="a", position=pos + 5),
                            cloud_pb2.TokenRequest(
                                session_id="b", position=pos, hidden=hidden_to_proto(hidden["b"])
                            ),
                            cloud_pb2.TokenRequest(session_id="nobody", position=0),
                        ]
                    )
                )
                gap, fine, unknown = reply.results
                assert gap.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                assert gap.error.expected_position == pos - 1
                assert not fine.HasField("error") and fine.reply.catch_up_rows == 1
                assert unknown.error.code == grpc.StatusCode.NOT_FOUND.value[0]
                return outs
        finally:
            await server.stop()

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert all(out == expected for out in outs.values())
