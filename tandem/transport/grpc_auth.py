"""Shared bearer token for internal gRPC services (a grpc.aio server interceptor).

With a token configured, every call must carry the metadata `authorization: Bearer
<token>` (compared in constant time); others end with UNAUTHENTICATED before the handler
runs. Methods in `exempt` (health probes) need no token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

AUTH_KEY = "authorization"
ERROR_KEY = "tandem-error"  # trailing metadata naming the error kind


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata for a client of a token-protected service (empty without a token)."""
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, exempt: frozenset[str] = frozenset()) -> None:
        if not token:
            raise ValueError("an empty token protects nothing")
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == AUTH_KEY:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return True
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._exempt:
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        return _denied(handler)


async def _deny(_request, context: grpc.aio.ServicerContext):
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token",
        trailing_metadata=((ERROR_KEY, "unauthenticated"),),
    )


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        _deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
