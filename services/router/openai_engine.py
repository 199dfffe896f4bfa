"""`OpenAIEngine`: one expert served by OpenAI-compatible upstreams (vLLM, another Tandem
node's HTTP API, ...), seen through the `Engine` protocol. The HTTP twin of `ExpertEngine`.

Like `ExpertEngine`, the router has no tokenizer: `encode_prompt` / `encode_chat` return a
placeholder of an estimated (upper-bound) length, and the exact context check is the
upstream's.

`generate` POSTs the request's original text to `{base}/chat/completions` (chat_messages) or
`{base}/completions` (prompt_text) of the least-loaded healthy replica, with `stream: true`
and `stream_options.include_usage`, and turns the server-sent events into `GenerationChunk`s:
one per non-empty text delta, then a last, empty-text chunk carrying `finish_reason` ("stop"
or "length"; any other upstream reason becomes "stop") and the final token counts.

Token counts: when the upstream sends `usage` (include_usage), the last chunk carries its
`prompt_tokens` / `completion_tokens`. Until then, and when it never does, they are
estimates: the prompt placeholder's length, and one completion token per text delta (exact
for vLLM and Tandem nodes, which stream one token per delta; an undercount for upstreams
that batch tokens). `completion_tokens` is never 0 when text was produced. `token_ids` holds
one placeholder 0 per text delta (the router has no token ids; this lets per-token metrics
such as TTFT count), `exit_layers` and `sources` are empty.

Errors (see `_raise_for_status`):

- upstream 429 / 502 / 503 / 504, connection errors, timeouts: tried on another replica
  (only before the first chunk, `ReplicaTable.stream_with_failover`); when every try failed
  or no healthy replica is left: `ExpertUnavailable`.
- upstream 401 / 403 / 404 (wrong token, wrong model name, wrong base URL): a router
  configuration problem, not the client's. Raised as `UpstreamMisconfigured`, a
  ConnectionError, so the replica counts as failed and another one is tried; in the end
  `ExpertUnavailable`. Logged as a warning naming the replica.
- other upstream 4xx (400 context length exceeded, 422, ...): `UpstreamInvalidRequest`, a
  ValueError carrying the upstream's message (the front end answers 400).
- other upstream 5xx, a `data: {"error": ...}` event, a malformed stream, or a connection
  lost after output began: `UpstreamError`, a RuntimeError (the front end answers 500 or
  sends an error event). Chunks already yielded stay yielded. (One exception: an error
  event that comes before any text and blames the request - code 4xx other than 429, or
  type invalid_request_error - as vLLM sends for some validation errors, is an
  `UpstreamInvalidRequest`.)

Closing the iterator early (client gone) closes the HTTP response, so the upstream sees the
disconnect and aborts the request. The replica that served the request is written to the
`served` context holder, exactly as `ExpertEngine` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.router.expert_engine import (
    RemoteExpert,
    served,
)
from services.router.replicas import (
    Replica,
    ReplicaTable,
)
from tandem.runtime.engine_api import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
)

log = logging.getLogger(__name__)

# Connecting must not hang on a black-holed host even when no timeout_s is configured.
CONNECT_TIMEOUT_S = 5.0
# At most this many characters of an upstream error body end up in an exception message.
MAX_ERROR_CHARS = 1000

_RETRY_ELSEWHERE_STATUS = frozenset({429, 502, 503, 504})
_MISCONFIGURED_STATUS = frozenset({401, 403, 404})


class UpstreamError(RuntimeError):
    """The upstream failed while serving the request (5xx, an error event in the stream, a
    malformed stream, or a connection lost after output began)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamInvalidRequest(ValueError):
    """The upstream rejected the request as invalid (a 4xx other than 401/403/404/429): the
    client's mistake. The message is the upstream's."""

    def __init__(
        self, message: str, *, status: int, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class UpstreamMisconfigured(ConnectionError):
    """The replica answered 401/403/404: wrong token, model name or base URL in the router's
    expert config. A ConnectionError, so `is_retryable_elsewhere` tries another replica and
    the failure counts against this one's health."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class OpenAIEngine(RemoteExpert):
    """Forward generation for one expert to its OpenAI-compatible replicas (base URLs up to
    and including /v1). One shared `httpx.AsyncClient`, created on first use unless `client`
    is given; `close()` closes it when this engine created it.

    `timeout_s` bounds connecting and each read (the wait for the first event and the gap
    between events), not the whole generation; None leaves reads unbounded (connecting is
    still bounded by CONNECT_TIMEOUT_S)."""

    def __init__(
        self,
        expert_id: str,
        table: ReplicaTable,
        *,
        max_context: int,
        upstream_model: str | None = None,
        n_layers: int = 1,
        attempts: int = 2,
        timeout_s: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            expert_id,
            table,
            max_context=max_context,
            n_layers=n_layers,
            attempts=attempts,
            timeout_s=timeout_s,
        )
        self.upstream_model = upstream_model or expert_id
        self._client = client
        self._owns_client = client is None

    async def close(self) -> None:
        """Close the HTTP client if this engine created it (an injected one is left open)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- request -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Streams hold a connection each for their whole length: no pool-wide cap.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._client = httpx.AsyncClient(limits=limits)
            self._owns_client = True
        return self._client

    def _timeout(self) -> httpx.Timeout:
        connect = CONNECT_TIMEOUT_S
        if self.timeout_s is not None:
            connect = min(connect, self.timeout_s)
        return httpx.Timeout(self.timeout_s, connect=connect)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {"model": self.upstream_model}
        if request.chat_messages is not None:
            body["messages"] = [
                {"role": m.role, "content": m.content} for m in request.chat_messages
            ]
        else:
            body["prompt"] = request.prompt_text
        body.update(
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
        )
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.ignore_eos:  # a vLLM extension; only sent when asked for
            body["ignore_eos"] = True
        return body

    def _open(self, request: GenerationRequest, replica: Replica) -> AsyncIterator[GenerationChunk]:
        holder = served.get()
        if holder is not None:
            holder["replica"] = replica.address
        return self._stream(request, replica)

    async def _stream(
        self, request: GenerationRequest, replica: Replica
    ) -> AsyncIterator[GenerationChunk]:
        chat = request.chat_messages is not None
        url = f"{replica.address}/{'chat/completions' if chat else 'completions'}"
        headers = {"accept": "text/event-stream", "x-request-id": request.request_id}
        if replica.token:
            headers["authorization"] = f"Bearer {replica.token}"
        async with self._http().stream(
            "POST", url, json=self._body(request), headers=headers, timeout=self._timeout()
        ) as response:
            await _raise_for_status(response, replica)
            parser = _StreamParser(chat=chat, prompt_tokens=len(request.prompt_ids))
            if response.headers.get("content-type", "").startswith("application/json"):
                # The upstream ignored stream=true: one complete response.
                await response.aread()
                for chunk in parser.whole(_json(response.text)):
                    yield chunk
                return
            async for data in _sse_data(response):
                if data == "[DONE]":
                    parser.done = True
                    break
                chunk = parser.event(_json(data))
                if chunk is not None:
                    yield chunk
            yield parser.final()

    def _broken_stream(self, exc: Exception) -> Exception | None:
        if isinstance(exc, httpx.HTTPError):  # output already went out: no failover
            return UpstreamError(
                f"the stream from expert {self.expert_id!r} broke: {type(exc).__name__}: {exc}"
            )
        return None


# -- responses -----------------------------------------------------------------------------


def _json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise UpstreamError(f"upstream sent invalid JSON: {text[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise UpstreamError(f"upstream sent a JSON {type(obj).__name__}, expected an object")
    return obj


def _error_fields(body: Any) -> tuple[str | None, Any, str | None, str | None]:
    """(message, code, type, param) from an OpenAI-style error body, also accepting vLLM's
    older flat shape and FastAPI's {"detail": ...}."""
    if not isinstance(body, dict):
        return None, None, None, None
    err = body.get("error")
    if isinstance(err, str):
        return err, None, None, None
    src = err if isinstance(err, dict) else body
    message = src.get("message")
    if message is None and "detail" in body:
        message = body["detail"]
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    kind, param = src.get("type"), src.get("param")
    return (
        message,
        src.get("code"),
        kind if isinstance(kind, str) else None,
        param if isinstance(param, str) else None,
    )


def _is_client_error(code: Any, kind: str | None) -> bool:
    """An in-stream error that blames the request (vLLM reports some validation errors as
    an error event with code 400 after the stream has started)."""
    if isinstance(code, int) and not isinstance(code, bool):
        return 400 <= code < 500 and code not in _RETRY_ELSEWHERE_STATUS
    return kind in ("invalid_request_error", "BadRequestError")


async def _raise_for_status(response: httpx.Response, replica: Replica) -> None:
    status = response.status_code
    if status < 400:
        return
    await response.aread()
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    message, code, _, param = _error_fields(body)
    if not message:
        message = response.text.strip()[:MAX_ERROR_CHARS] or response.reason_phrase
    message = message[:MAX_ERROR_CHARS]
    where = f"replica {replica.address} of expert {replica.expert_id!r}"
    if status in _RETRY_ELSEWHERE_STATUS:
        raise httpx.HTTPStatusError(
            f"{where} answered HTTP {status}: {message}",
            request=response.request,
            response=response,
        )
    if status in _MISCONFIGURED_STATUS:
        log.warning(
            "%s answered HTTP %d (check the expert's base URL, model and token): %s",
            where,
            status,
            message,
        )
        raise UpstreamMisconfigured(
            f"{where} cannot serve it as configured (HTTP {status}): {message}", status=status
        )
    if status < 500:
        raise UpstreamInvalidRequest(
            message, status=status, code=code if isinstance(code, str) else None, param=param
        )
    raise UpstreamError(f"{where} failed with HTTP {status}: {message}", status=status)


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # a comment (keep-alive)
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _finish_reason(value: Any) -> FinishReason:
    return "length" if value == "length" else "stop"


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _StreamParser:
    """Turns the upstream's events (dicts) into chunks, keeping the running counts."""

    def __init__(self, *, chat: bool, prompt_tokens: int) -> None:
        self.chat = chat
        self.prompt_tokens = prompt_tokens  # the estimate, until usage says otherwise
        self.usage_completion: int | None = None
        self.deltas = 0
        self.finish: Any = None
        self.done = False
        self.energy: dict[str, Any] | None = None

    @property
    def completion_tokens(self) -> int:
        if self.usage_completion is None:
            return self.deltas
        return max(self.usage_completion, 1 if self.deltas else 0)

    def _usage(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return
        prompt = _count(usage.get("prompt_tokens"))
        if prompt is not None:
            self.prompt_tokens = prompt
        completion = _count(usage.get("completion_tokens"))
        if completion is not None:
            self.usage_completion = completion
        ext = usage.get("tandem")  # a Tandem upstream's energy, for the router's telemetry
        if isinstance(ext, dict) and "energy_joules" in ext and "energy_source" in ext:
            self.energy = {k: ext[k] for k in ("energy_joules", "energy_source")}

    def _choice(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return None
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return choice
        return None

    def _chunk(self, text: str, n_tokens: int) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            token_ids=(0,) * n_tokens,
            exit_layers=(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )

    def event(self, obj: dict[str, Any]) -> GenerationChunk | None:
        """One streamed event; a chunk when it carries new text."""
        if "error" in obj:
            message, code, kind, param = _error_fields(obj)
            message = message or repr(obj["error"])
            if not self.deltas and _is_client_error(code, kind):  # nothing out yet
                status = code if isinstance(code, int) else 400
                raise UpstreamInvalidRequest(message, status=status, param=param)
            raise UpstreamError(f"upstream error in the stream: {message}")
        self._usage(obj)
        choice = self._choice(obj)
        if choice is None:
            return None
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
        if self.chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str) or not text:
            return None
        self.deltas += 1
        return self._chunk(text, 1)

    def final(self) -> GenerationChunk:
        """The last chunk: no text, the finish reason and the final counts."""
        if self.finish is None and not self.done:
            raise UpstreamError("the upstream stream ended without a finish_reason or [DONE]")
        return GenerationChunk(
            text="",
            token_ids=(),
            exit_layers=(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=_finish_reason(self.finish),
            report=self.energy,
        )

    def whole(self, obj: dict[str, Any]) -> list[GenerationChunk]:
        """A complete (non-streamed) response: its text, then the last chunk."""
        if "error" in obj:
            message, _, _, _ = _error_fields(obj)
            raise UpstreamError(f"upstream error: {message or obj['error']!r}")
        self._usage(obj)
        choice = self._choice(obj) or {}
        self.finish = choice.get("finish_reason") or "stop"
        if self.chat:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        out: list[GenerationChunk] = []
        if isinstance(text, str) and text:
            n = self.usage_completion or 1
            self.deltas = n
            out.append(self._chunk(text, n))
        out.append(self.final())
        return out


__all__ = [
    "CONNECT_TIMEOUT_S",
    "OpenAIEngine",
    "UpstreamError",
    "UpstreamInvalidRequest",
    "UpstreamMisconfigured",
]
