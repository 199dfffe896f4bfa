"""Edge nodes on tiny random models behind real gRPC servers on loopback, for router tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.grpc_server import start_grpc_server
from tandem.runtime.decoder import ExitDecoder
from tests.tiny import ByteCodec


@contextlib.asynccontextmanager
async def tiny_edge_servers(models: dict, max_context: int) -> AsyncIterator[dict]:
    """One started edge engine and gRPC server (port chosen by the OS) per named model;
    yields {name: server}; stops them all on exit."""
    engines, servers = {}, {}
    try:
        for name, model in models.items():
            engine = EdgeEngine(
                name,
                ExitDecoder(model),
                ByteCodec(),
                EngineConfig(max_batch=4, max_context=max_context),
            )
            engine.start()
            engines[name] = engine
            servers[name] = await start_grpc_server(engine, "127.0.0.1", 0)
        yield servers
    finally:
        for s in servers.values():
            await s.stop(grace=None)
        for e in engines.values():
            e.stop()
