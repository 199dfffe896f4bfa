"""Kill -9 the cloud context manager in the middle of a collaborative generation and start
a new one (same port, same Redis, new replica id). The edge engine keeps generating (its
own tokens while the cloud is gone, `fallback`), then asks the new cloud again, which
rebuilds the session from the Redis log: no context is lost, so every cloud token, before
and after the restart, is the full model's greedy choice after its prefix. Real processes,
real Redis, tiny model."""

from __future__ import annotations

import torch

from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from tandem.launch import free_port
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.model import Segment
from tests.services.cloud_ctx.cloud_process import CloudProcess
from tests.services.cloud_ctx.tiny_cloud import SPLIT
from tests.services.edge_node.test_collab import GREEDY, _run
from tests.tiny import ByteCodec, tiny_model

KILL_AT = 5  # tokens generated before the kill
N_TOKENS = 16


@torch.inference_mode()
def _greedy_after_each_prefix(model, ids: list[int]) -> list[int]:
    """argmax of the full model after ids[:i+1], for every i (one forward)."""
    kv = model.new_kv()
    h = model.embed(torch.tensor(ids))
    h = model.run_layers(h, torch.arange(len(ids)), [Segment(kv, 0, len(ids), 0)], 0, 6)
    return model.logits(h).argmax(-1).tolist()


def test_cloud_killed_mid_generation_loses_no_context(redis_url, redis_prefix):
    model = tiny_model("llama")
    port = free_port()

    def start(replica: str) -> CloudProcess:
        args = ["--grpc-port", str(port), "--redis-url", redis_url]
        return CloudProcess(
            "tests.services.cloud_ctx.tiny_cloud",
            args + ["--redis-prefix", redis_prefix, "--replica-id", replica],
        )

    clouds = [start("one")]

    class Restarting(EdgeEngine):
        def _step(self):
            if self._running and len(self._running[0].ids) == KILL_AT and len(clouds) == 1:
                clouds[0].kill()
                clouds.append(start("two"))
            super()._step()

    link = CloudLink(CloudLinkConfig(f"127.0.0.1:{port}", timeout_s=5, backoff_s=0.05))
    link.start()
    engine = Restarting(
        "tiny", ExitDecoder(model, depth=SPLIT), ByteCodec(), EngineConfig(tau=1.0), link
    )
    engine.start()
    try:
        params = GREEDY.__class__(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
        [(ids, sources)] = _run(engine, ["restart the cloud"], params)
    finally:
        engine.stop()
        link.close()
        for c in clouds:
            c.kill()
    assert len(clouds) == 2 and len(ids) == N_TOKENS
    print(f"cloud-kill drill: sent {N_TOKENS}, succeeded {len(ids)}, lost {N_TOKENS - len(ids)}")
    prompt = ByteCodec().encode("restart the cloud")
    want = _greedy_after_each_prefix(model, prompt + ids)[len(prompt) - 1 :]
    cloud_positions = [i for i, s in enumerate(sources) if s == "cloud"]
    assert all(ids[i] == want[i] for i in cloud_positions), (ids, want, sources)
    assert any(i > KILL_AT for i in cloud_positions), sources  # the new cloud answered
    assert "".join(clouds[1].output).count("rebuilt session") >= 1
