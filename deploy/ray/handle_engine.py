"""The router's side of a Ray Serve expert: `HandleEngine`, an `Engine` over a DeploymentHandle.

What crosses the handle is plain data (dicts of str / int / float / list), so nothing of ours
has to be pickled across processes:

- request (`request_to_wire`): `{"request_id", "prompt" | "messages", "params"}`: the request's
  original text (the router has no tokenizer; the expert tokenizes, as over gRPC) and the
  sampling parameters.
- stream items (`chunk_to_wire`): one dict per `GenerationChunk`; the first also carries
  `"replica"` (the Serve replica that took the request).
- errors: the expert never lets an engine error escape as a Ray exception; it yields one
  `{"error": {"kind", "message", ...}}` item and ends (`error_to_wire`). `HandleEngine` raises
  it again as the local type, so the router's OpenAI layer answers as it does for gRPC
  experts: "invalid" -> ValueError (400), "prompt_too_long" -> PromptTooLong (400),
  "overloaded" -> EngineOverloaded (429), anything else -> RuntimeError (500 / failover).

Ray's own failures map to `ExpertUnavailable` (an EngineOverloaded: 429 with Retry-After, and
the router's failover moves on to the next expert before the first chunk): Serve's
BackPressureError (the expert's queue is full), an unavailable deployment, a dead actor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict
from typing import Any

from services.router.expert_engine import ExpertUnavailable, RemoteExpert, served
from services.router.replicas import ReplicaTable
from tandem.runtime.engine_api import (
    ChatMessage,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from tandem.runtime.sampling import SamplingParams

SERVE_SCHEME = "serve://"
_ROLES = ("system", "user", "assistant")
_PARAM_KEYS = frozenset(f for f in SamplingParams.__dataclass_fields__)


def replica_address(expert_id: str) -> str:
    """The pseudo replica address the router's ReplicaTable holds for a Serve expert (Serve,
    not the router, picks among the deployment's real replicas)."""
    return f"{SERVE_SCHEME}{expert_id}"


# -- the wire format -------------------------------------------------------------------------


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    if request.prompt_text is None and request.chat_messages is None:
        raise ValueError("a Serve expert needs the request's prompt_text or chat_messages")
    params = asdict(request.params)
    params["stop"] = list(request.params.stop)
    wire: dict[str, Any] = {"request_id": request.request_id, "params": params}
    if request.chat_messages is not None:
        wire["messages"] = [{"role": m.role, "content": m.content} for m in request.chat_messages]
    else:
        wire["prompt"] = request.prompt_text
    return wire


def params_from_wire(raw: object) -> SamplingParams:
    """SamplingParams from the wire dict; ValueError for anything malformed."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, Mapping):
        raise ValueError("params must be a mapping")
    unknown = sorted(str(k) for k in raw if k not in _PARAM_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    values = dict(raw)
    stop = values.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a list of strings")
    values["stop"] = tuple(stop)
    for key, kind in (("max_tokens", int), ("seed", int)):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
            raise ValueError(f"{key} must be an integer")
    for key in ("temperature", "top_p"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"{key} must be a number")
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{key} must be finite")
    return SamplingParams(**values)


def messages_from_wire(raw: object) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs a role in {_ROLES} and a string content")
        out.append(ChatMessage(role=role, content=content))
    return tuple(out)


def chunk_to_wire(chunk: GenerationChunk) -> dict[str, Any]:
    return {
        "text": chunk.text,
        "token_ids": list(chunk.token_ids),
        "exit_layers": list(chunk.exit_layers),
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "finish_reason": chunk.finish_reason,
        "sources": list(chunk.sources),
    }


def chunk_from_wire(item: Mapping[str, Any]) -> GenerationChunk:
    return GenerationChunk(
        text=item["text"],
        token_ids=tuple(item["token_ids"]),
        exit_layers=tuple(item["exit_layers"]),
        prompt_tokens=item["prompt_tokens"],
        completion_tokens=item["completion_tokens"],
        finish_reason=item.get("finish_reason"),
        sources=tuple(item.get("sources", ())),
    )


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, PromptTooLong):
        kind = "prompt_too_long"
    elif isinstance(exc, ValueError):
        kind = "invalid"
    elif isinstance(exc, EngineOverloaded):
        kind = "overloaded"
    else:
        kind = "internal"
    message = str(exc) or type(exc).__name__
    if kind == "internal":
        message = f"internal error: {type(exc).__name__}: {exc}"
    body: dict[str, Any] = {"kind": kind, "message": message}
    for attr in ("param", "code", "retry_after"):
        value = getattr(exc, attr, None)
        if isinstance(value, str | int | float):
            body[attr] = value
    return {"error": body}


class ExpertInvalidRequest(ValueError):
    """The expert refused the request's input (the client's 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ExpertPromptTooLong(ExpertInvalidRequest, PromptTooLong):
    """The expert's own context check (the router's placeholder counts are an upper bound, so
    this is rare)."""


class ExpertOverloaded(EngineOverloaded):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class ExpertFailed(RuntimeError):
    """The expert failed while generating (not the client's fault)."""


def error_from_wire(body: Mapping[str, Any], expert_id: str) -> Exception:
    kind = body.get("kind")
    message = str(body.get("message") or kind)
    if kind == "prompt_too_long":
        return ExpertPromptTooLong(message, body.get("param"), body.get("code"))
    if kind == "invalid":
        return ExpertInvalidRequest(message, body.get("param"), body.get("code"))
    if kind == "overloaded":
        return ExpertOverloaded(f"expert {expert_id!r}: {message}", body.get("retry_after"))
    return ExpertFailed(f"expert {expert_id!r}: {message}")


# -- Ray's own failures ----------------------------------------------------------------------


def _ray_unavailable_types() -> tuple[type[BaseException], ...]:
    """Ray exceptions that mean "this expert cannot take the request now" (imported lazily so
    this module, and its unit tests, work without Ray)."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )
    except ImportError:  # pragma: no cover - Ray is a deploy-time dependency
        return ()
    return (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RayActorError,
        ActorDiedError,
        ActorUnavailableError,
    )


def _unwrap(exc: BaseException) -> BaseException:
    """A RayTaskError's cause (an exception raised inside the replica), else `exc`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


# -- the engine ------------------------------------------------------------------------------

StreamOpener = Callable[[dict[str, Any]], Any]


def handle_opener(handle: Any) -> StreamOpener:
    """Open a streaming call of `handle.generate` (a Serve DeploymentHandle); the result is a
    DeploymentResponseGenerator (async-iterable, `cancel()`-able)."""
    streaming = handle.options(stream=True)
    return lambda wire: streaming.generate.remote(wire)


class HandleEngine(RemoteExpert):
    """One Serve expert deployment seen through the `Engine` protocol (placeholder token
    counts, as for every remote expert). The ReplicaTable holds one pseudo replica per expert
    (`serve://<id>`): Serve, not the router, routes among the deployment's replicas, scales
    them and restarts unhealthy ones; the table's entry is for readiness, the in-flight count
    (`queue_depth`) and the `x-tandem-replica` header, which names the Serve replica that
    served (`serve://<id>/<replica id>`)."""

    def __init__(
        self,
        expert_id: str,
        table: ReplicaTable,
        handle: Any,
        *,
        opener: StreamOpener | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(expert_id, table, **kwargs)
        self.handle = handle
        self._open = opener or handle_opener(handle)
        self._unavailable = _ray_unavailable_types()

    def _map(self, exc: BaseException, *, started: bool) -> BaseException:
        inner = _unwrap(exc)
        if isinstance(inner, ValueError | EngineOverloaded):
            return inner
        if not started and isinstance(inner, self._unavailable):
            return ExpertUnavailable(f"expert {self.expert_id!r} is unavailable: {inner}")
        return ExpertFailed(f"expert {self.expert_id!r} failed: {type(inner).__name__}: {inner}")

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        wire = request_to_wire(request)
        replica = self.table.replicas(self.expert_id)[0]
        holder = served.get()
        if holder is not None:
            holder["replica"] = replica.address
        with self.table.in_flight(replica):
            stream = self._open(wire)
            started = done = False
            try:
                while True:
                    try:
                        item = await anext(stream, None)
                    except Exception as exc:
                        raise self._map(exc, started=started) from exc
                    if item is None:
                        done = True
                        return
                    if "error" in item:
                        done = True
                        raise error_from_wire(item["error"], self.expert_id)
                    if not started and holder is not None and item.get("replica"):
                        holder["replica"] = f"{replica.address}/{item['replica']}"
                    started = True
                    yield chunk_from_wire(item)
            finally:
                if not done:  # the client went away (or we failed): stop the expert's work
                    cancel = getattr(stream, "cancel", None)
                    if cancel is not None:
                        with contextlib.suppress(Exception):
                            cancel()
