"""Server-sent events and client-disconnect handling for streaming responses."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T]:
    """Run `fn()`; cancel it if the client disconnects first. Returns (gone, result);
    result is meaningless when gone. Exceptions of `fn` propagate unwrapped."""
    gone = False
    results: list[T] = []
    errors: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            await wait_for_disconnect(receive)
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            results.append(await fn())
        except Exception as exc:
            errors.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if errors and not gone:
        raise errors[0]
    return gone, (results[0] if results else None)  # type: ignore[return-value]


async def aclose_quietly(it: object) -> None:
    """Close an async iterator (aborts the engine request), never raising."""
    aclose = getattr(it, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            log.exception("closing the engine iterator failed")


class EventStreamResponse(Response):
    """Server-sent events from `events`; stops when the client disconnects, and always
    closes `events` and runs `cleanup` (shielded) at the end."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        )
        self._events = events
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    start = {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": self.raw_headers,
                    }
                    await send(start)
                    async for data in self._events:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # ASGI >= 2.4 servers raise from send() once the client left
                    pass
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await aclose_quietly(self._events)
                await self._cleanup()


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude=exclude)
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
