"""OpenAI-shaped error responses and the exception handlers that produce them.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
for anything the client sent (bad JSON, bad UTF-8, bad values, unknown model, too long a
prompt, too large a body) and a 5xx only for faults of the server itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tandem.runtime.engine_api import EngineOverloaded, PromptTooLong

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
DEFAULT_RETRY_AFTER_S = 1


def error_body(
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error with an HTTP status, rendered in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    """Raised by the body-size middleware while the body is being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        code="request_too_large",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(
    max_context: int, prompt_tokens: int | None, max_tokens: int | None, *, param: str
) -> ApiError:
    if prompt_tokens is None or max_tokens is None:
        detail = ""
    else:
        detail = (
            f" However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in "
            f"the prompt, {max_tokens} in the completion)."
        )
    return ApiError(
        400,
        f"This model's maximum context length is {max_context} tokens.{detail} "
        "Please reduce the length of the prompt or of the completion.",
        param=param,
        code="context_length_exceeded",
    )


def overloaded(exc: BaseException | None = None) -> ApiError:
    retry_after = getattr(exc, "retry_after", None) or DEFAULT_RETRY_AFTER_S
    detail = str(exc) if exc is not None else ""
    message = "The engine is overloaded; retry after a short wait."
    return ApiError(
        429,
        f"{message} ({detail})" if detail else message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, round(float(retry_after))))},
    )


def unauthorized(provided: bool) -> ApiError:
    if not provided:
        return ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        )
    return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


# -------------------------------------------------------------- validation error -> param

_TYPE_TAG = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "tuple"})
_LOC_ROOTS = frozenset({"body", "query", "path", "header", "cookie"})


def param_from_loc(loc: Sequence[int | str]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; drops pydantic union tags."""
    parts = list(loc)
    if parts and parts[0] in _LOC_ROOTS:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _TYPE_TAG.match(part) and part not in _TYPE_NAMES:
            out += f".{part}" if out else part
    return out or None


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def validation_error(errors: Iterable[Mapping[str, Any]]) -> ApiError:
    """One 400 for pydantic errors. Where a union failed on every branch, the errors of the
    deeper branch (`stop[0]: ...`) are kept and the shallow ones (`stop: not a string`)
    dropped."""
    pairs = [(param_from_loc(e.get("loc", ())), _message(e)) for e in errors]
    if not pairs:
        return ApiError(400, "Invalid request.")
    params = {p for p, _ in pairs if p}

    def shadowed(p: str | None) -> bool:
        return p is not None and any(q.startswith((p + "[", p + ".")) for q in params)

    kept = [(p, m) for p, m in pairs if not shadowed(p)] or pairs
    texts: list[str] = []
    for p, m in kept[:4]:
        text = f"{p}: {m}" if p else m
        if text not in texts:
            texts.append(text)
    return ApiError(400, "Invalid request: " + "; ".join(texts), param=kept[0][0])


# --------------------------------------------------------------------------- handlers


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    kind = INVALID_REQUEST if exc.status_code < 500 else "server_error"
    return ApiError(exc.status_code, message, type=kind, headers=exc.headers).response()


async def _prompt_too_long(_: Request, exc: Exception) -> JSONResponse:
    err = ApiError(400, str(exc) or "Prompt too long.", code="context_length_exceeded")
    return err.response()


async def _overloaded(_: Request, exc: Exception) -> JSONResponse:
    return overloaded(exc).response()


async def _body_too_large(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return body_too_large(exc.limit).response()


async def _client_disconnect(_: Request, exc: Exception) -> JSONResponse:
    # Nobody reads this; returning a response keeps the 500 path and its log quiet.
    return ApiError(400, "Client disconnected.").response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "Internal server error.", type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(PromptTooLong, _prompt_too_long)
    app.add_exception_handler(EngineOverloaded, _overloaded)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
