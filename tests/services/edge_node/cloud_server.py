"""A real cloud context manager gRPC server on 127.0.0.1, run on its own event-loop thread
so synchronous tests (and the edge engine's threads) can talk to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.cloud_ctx.context_manager import CloudContextManager
from services.cloud_ctx.grpc_server import start_cloud_server
from services.cloud_ctx.session_store import SessionStore, StoreLimits
from tandem.runtime.model import DecoderModel


def cloud_manager(model: DecoderModel, split: int, **limits) -> CloudContextManager:
    store = SessionStore(lambda: model.new_kv(first_layer=split), StoreLimits(**limits))
    return CloudContextManager(model, split, store)


@contextmanager
def cloud_server(manager: CloudContextManager, token: str | None = None) -> Iterator[int]:
    """Serve `manager` (with `token`: only to callers that present it); yields the port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_cloud_server(manager, token=token), loop
    ).result(10)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
