"""Failure drill: the edge-cloud link is cut in the middle of collaborative generation. The
edge falls back to its own half's tokens (standalone), finishes every request and says so
(every token after the cut has source "fallback"); nothing is lost. Tiny llama, a real
cloud context manager over gRPC on loopback; the cut is the cloud server going away."""

from __future__ import annotations

import asyncio

from services.edge_node.cloud_link import CloudLink
from tandem.runtime.engine_api import GenerationRequest
from tandem.runtime.sampling import SamplingParams
from tests.services.edge_node.cloud_server import cloud_manager, cloud_server
from tests.services.edge_node.test_collab import SPLIT, collab_engine
from tests.tiny import ByteCodec, tiny_model

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["the cloud", "edge and cloud together", "x"]


def test_cut_link_mid_generation_falls_back_and_says_so() -> None:
    model = tiny_model("llama")
    server = cloud_server(cloud_manager(model, SPLIT))
    port = server.__enter__()
    cut = asyncio.Event()
    with collab_engine(model, f"127.0.0.1:{port}", tau=1.0, timeout_s=1.0, backoff_s=30.0) as (
        engine,
        link,
    ):

        async def one(i: int, prompt: str) -> list[str]:
            req = GenerationRequest(f"r{i}", tuple(ByteCodec().encode(prompt)), PARAMS)
            sources: list[str] = []
            async for chunk in engine.generate(req):
                sources.extend(chunk.sources)
                if len(sources) >= 4 and not cut.is_set():
                    cut.set()
                    await asyncio.to_thread(server.__exit__, None, None, None)  # the cut
            return sources

        async def main() -> list[list[str]]:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

        results = asyncio.run(asyncio.wait_for(main(), 120))
        assert isinstance(link, CloudLink) and not link.available()  # circuit open after the cut
    lost = sum(len(s) != PARAMS.max_tokens for s in results)
    print(f"link-cut drill: sent {len(PROMPTS)}, succeeded {len(PROMPTS) - lost}, lost {lost}")
    assert lost == 0
    for sources in results:
        assert sources[0] == "cloud"  # collaborative before the cut
        assert sources[-1] == "fallback"  # standalone after it, and reported per token
        first_fallback = sources.index("fallback")
        assert set(sources[first_fallback:]) == {"fallback"}
