"""The edge node's OpenAI-compatible HTTP API.

`build_app(engine, served_model_id=..., limits=ApiLimits(), metrics=EdgeMetrics(...))`
returns a FastAPI app with:

- GET  /health                open; 200 {"status": "ok"}
- GET  /metrics               open; Prometheus text from `metrics.registry`
- GET  /v1/models, /v1/models/{id}
- POST /v1/completions, /v1/chat/completions   (stream or not)

With `api_key` set, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise).

Responses follow OpenAI's shapes. `usage` carries one non-standard field, `usage.tandem`:
`{"n_layers", "mean_exit_layer", "early_exit_fraction"}` computed from the exit layer of
every generated token (exit layer == n_layers means the token ran at full depth).

A client that goes away (non-streaming or streaming) gets its engine iterator closed
(`aclose()`), which aborts the request in the engine. If the engine fails mid-stream the
stream gets one `data: {"error": {...}}` event and then `data: [DONE]`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from services.edge_node.body_limit import BodySizeLimitMiddleware
from services.edge_node.errors import (
    ApiError,
    BodyTooLarge,
    context_length_exceeded,
    install_error_handlers,
    model_not_found,
    overloaded,
    unauthorized,
    validation_error,
)
from services.edge_node.metrics import EdgeMetrics, RequestRecorder
from services.edge_node.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TandemUsage,
    Usage,
)
from services.edge_node.sse import (
    SSE_DONE,
    EventStreamResponse,
    aclose_quietly,
    sse_event,
    unless_disconnected,
)
from tandem.runtime.engine_api import (
    ChatMessage,
    Engine,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from tandem.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")
ReqT = TypeVar("ReqT", bound=BaseModel)

CLIENT_CLOSED = 499  # status recorded in metrics when the client left (nginx convention)


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 2048
    max_stop: int = 4

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_cap", "max_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def check_api_key(request: Request, api_key: str | None) -> None:
    """With an API key configured, require `Authorization: Bearer <key>` (401 otherwise)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(provided=bool(header))
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise unauthorized(provided=True)


# ------------------------------------------------------------------------ one request


@dataclass
class _Output:
    """What has come out of the engine for one request so far."""

    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def add(self, chunk: GenerationChunk, recorder: RequestRecorder) -> None:
        recorder.on_tokens(chunk.exit_layers, len(chunk.token_ids) or None, chunk.sources)
        self.text.append(chunk.text)
        self.exit_layers.extend(chunk.exit_layers)
        self.sources.extend(chunk.sources)
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.report is not None:
            self.report = dict(chunk.report)

    def usage(self, n_layers: int) -> Usage:
        layers = self.exit_layers
        if layers:
            mean: float | None = sum(layers) / len(layers)
            early: float | None = sum(1 for x in layers if x < n_layers) / len(layers)
        else:
            mean = early = None
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            tandem=TandemUsage(
                n_layers=n_layers,
                mean_exit_layer=mean,
                early_exit_fraction=early,
                mode=self.mode,
                cloud_tokens=self.sources.count("cloud"),
                fallback_tokens=self.sources.count("fallback"),
                **self.report,
            ),
        )

    @property
    def mode(self) -> str:
        if "fallback" in self.sources:
            return "fallback"
        return "collaborative" if "cloud" in self.sources else "edge"


@dataclass(frozen=True)
class _Job:
    """A validated request, ready for the engine."""

    id: str
    created: int
    request: GenerationRequest
    prompt_param: str
    max_tokens: int
    stream: bool
    include_usage: bool


class _Api:
    def __init__(
        self,
        engine: Engine,
        served_model_id: str,
        limits: ApiLimits,
        metrics: EdgeMetrics,
        api_key: str | None,
    ) -> None:
        self.engine = engine
        self.model_id = served_model_id
        self.limits = limits
        self.metrics = metrics
        self.api_key = api_key
        self.started = int(time.time())

    # -- dependencies ----------------------------------------------------------------

    async def check_auth(self, request: Request) -> None:
        check_api_key(request, self.api_key)

    # -- routes ----------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _card(self) -> ModelCard:
        return ModelCard(
            id=self.model_id, created=self.started, max_model_len=self.engine.max_context
        )

    async def list_models(self) -> JSONResponse:
        return JSONResponse(ModelList(data=[self._card()]).model_dump(mode="json"))

    async def get_model(self, model: str) -> JSONResponse:
        if model != self.model_id:
            raise model_not_found(model)
        return JSONResponse(self._card().model_dump(mode="json"))

    async def completions(self, request: Request) -> Response:
        try:
            req = await _parse(request, CompletionRequest)
            self._check_model(req.model)
            prompt_ids = _encode(lambda: self.engine.encode_prompt(req.prompt_text), "prompt")
            job = self._job("cmpl", req, prompt_ids, req.max_tokens, "max_tokens", "prompt")
            job = _with_source(job, prompt_text=req.prompt_text)
        except (ApiError, BodyTooLarge) as exc:
            self.metrics.record_rejected(getattr(exc, "status", 413))
            raise
        if job.stream:
            return await self._stream(request, job, _CompletionFormat(job, self.model_id))
        return await self._complete(request, job, _CompletionFormat(job, self.model_id))

    async def chat_completions(self, request: Request) -> Response:
        try:
            req = await _parse(request, ChatCompletionRequest)
            self._check_model(req.model)
            messages = [ChatMessage(role=m.engine_role, content=m.text) for m in req.messages]
            prompt_ids = _encode(lambda: self.engine.encode_chat(messages), "messages")
            job = self._job(
                "chatcmpl",
                req,
                prompt_ids,
                req.requested_max_tokens,
                req.max_tokens_param,
                "messages",
            )
            job = _with_source(job, chat_messages=tuple(messages))
        except (ApiError, BodyTooLarge) as exc:
            self.metrics.record_rejected(getattr(exc, "status", 413))
            raise
        if job.stream:
            return await self._stream(request, job, _ChatFormat(job, self.model_id))
        return await self._complete(request, job, _ChatFormat(job, self.model_id))

    # -- request preparation ---------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise model_not_found(model)

    def _job(
        self,
        prefix: str,
        req: CompletionRequest | ChatCompletionRequest,
        prompt_ids: tuple[int, ...],
        requested: int | None,
        max_tokens_param: str,
        prompt_param: str,
    ) -> _Job:
        limits, max_context = self.limits, self.engine.max_context
        stop = req.stop_list
        if len(stop) > limits.max_stop:
            raise ApiError(
                400, f"At most {limits.max_stop} stop sequences are allowed.", param="stop"
            )
        if requested is not None and requested > limits.max_tokens_cap:
            raise ApiError(
                400,
                f"{max_tokens_param} is too large: {requested}. This server allows at most "
                f"{limits.max_tokens_cap} completion tokens.",
                param=max_tokens_param,
            )
        if not prompt_ids:
            raise ApiError(400, "The prompt must not be empty.", param=prompt_param)
        n_prompt = len(prompt_ids)
        if requested is None:
            max_tokens = min(limits.max_tokens_cap, max_context - n_prompt)
            if max_tokens < 1:
                raise context_length_exceeded(max_context, n_prompt, 1, param=prompt_param)
        else:
            max_tokens = requested
            if n_prompt + max_tokens > max_context:
                raise context_length_exceeded(max_context, n_prompt, max_tokens, param=prompt_param)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # "only the most likely token" == greedy
            temperature, top_p = 0.0, 1.0
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=req.seed,
                stop=stop,
                ignore_eos=req.ignore_eos,
            )
        except ValueError as exc:
            raise ApiError(400, f"Invalid sampling parameters: {exc}") from exc
        rid = f"{prefix}-{uuid.uuid4().hex}"
        return _Job(
            id=rid,
            created=int(time.time()),
            request=GenerationRequest(request_id=rid, prompt_ids=prompt_ids, params=params),
            prompt_param=prompt_param,
            max_tokens=max_tokens,
            stream=req.stream,
            include_usage=req.include_usage,
        )

    def _engine_error(self, exc: Exception, job: _Job) -> ApiError:
        if isinstance(exc, PromptTooLong):
            return context_length_exceeded(
                self.engine.max_context,
                len(job.request.prompt_ids),
                job.max_tokens,
                param=job.prompt_param,
            )
        if isinstance(exc, EngineOverloaded):
            return overloaded(exc)
        if isinstance(exc, ValueError):  # the engine (or an expert behind it) refused the input
            return ApiError(
                400,
                str(exc) or "invalid request",
                param=getattr(exc, "param", None),
                code=getattr(exc, "code", None),
            )
        log.error("engine failed on %s", job.id, exc_info=exc)
        return ApiError(500, "The engine failed while generating.", type="server_error")

    # -- generation ------------------------------------------------------------------

    async def _complete(self, request: Request, job: _Job, fmt: _Format) -> Response:
        recorder = self.metrics.start_request()
        out = _Output(prompt_tokens=len(job.request.prompt_ids))
        status, finish = 200, "abort"
        try:

            async def collect() -> None:
                it = self.engine.generate(job.request)
                try:
                    async for chunk in it:
                        out.add(chunk, recorder)
                finally:
                    await aclose_quietly(it)

            try:
                gone, _ = await unless_disconnected(request.receive, collect)
            except Exception as exc:
                err = self._engine_error(exc, job)
                status, finish = err.status, "error"
                raise err from exc
            if gone:
                status = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)
            finish = out.finish_reason or "stop"
            body = fmt.response("".join(out.text), finish, out.usage(self.engine.n_layers))
            headers = {"x-request-id": job.id, "x-tandem-mode": out.mode}
            return JSONResponse(body, headers=headers)
        finally:
            recorder.finish(
                finish_reason=finish,
                status=status,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
            )

    async def _stream(self, request: Request, job: _Job, fmt: _Format) -> Response:
        recorder = self.metrics.start_request()
        out = _Output(prompt_tokens=len(job.request.prompt_ids))
        state = {"finish": "abort", "status": 200}

        async def finish() -> None:
            recorder.finish(
                finish_reason=state["finish"],
                status=int(state["status"]),
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
            )

        it: AsyncIterator[GenerationChunk] | None = None

        async def first() -> GenerationChunk | None:
            nonlocal it
            it = self.engine.generate(job.request)
            return await anext(it, None)

        try:
            gone, head = await unless_disconnected(request.receive, first)
        except Exception as exc:
            await aclose_quietly(it)
            err = self._engine_error(exc, job)
            state.update(finish="error", status=err.status)
            await finish()
            raise err from exc
        if gone:
            await aclose_quietly(it)
            state["status"] = CLIENT_CLOSED
            await finish()
            return Response(status_code=CLIENT_CLOSED)
        assert it is not None
        engine_it = it

        async def events() -> AsyncIterator[bytes]:
            try:
                start = fmt.start_event()
                if start:
                    yield start
                chunk = head
                while chunk is not None:
                    out.add(chunk, recorder)
                    if chunk.text:
                        yield fmt.text_event(chunk.text)
                    chunk = await anext(engine_it, None)
                state["finish"] = out.finish_reason or "stop"
                yield fmt.finish_event(state["finish"])
                if job.include_usage:
                    yield fmt.usage_event(out.usage(self.engine.n_layers))
            except Exception as exc:
                err = self._engine_error(exc, job)
                state["finish"] = "error"
                yield sse_event(err.body())
            finally:
                await aclose_quietly(engine_it)
            yield SSE_DONE

        async def cleanup() -> None:
            await aclose_quietly(engine_it)
            await finish()

        return EventStreamResponse(events(), cleanup, headers={"x-request-id": job.id})


# --------------------------------------------------------------------- response shapes


class _Format:
    """Builds the bodies and SSE events of one endpoint."""

    def __init__(self, job: _Job, model: str) -> None:
        self.job = job
        self.model = model

    def _usage_exclude(self) -> set[str] | None:
        return None if self.job.include_usage else {"usage"}

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        raise NotImplementedError

    def start_event(self) -> bytes:
        return b""

    def text_event(self, text: str) -> bytes:
        raise NotImplementedError

    def finish_event(self, finish_reason: str) -> bytes:
        raise NotImplementedError

    def usage_event(self, usage: Usage) -> bytes:
        raise NotImplementedError


class _CompletionFormat(_Format):
    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        j = self.job
        return CompletionResponse(
            id=j.id, created=j.created, model=self.model, choices=choices, usage=usage
        )

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return self._body([choice], usage).model_dump(mode="json")

    def text_event(self, text: str) -> bytes:
        choice = CompletionChoice(text=text, finish_reason=None)
        return sse_event(self._body([choice], None), exclude=self._usage_exclude())

    def finish_event(self, finish_reason: str) -> bytes:
        choice = CompletionChoice(text="", finish_reason=finish_reason)
        return sse_event(self._body([choice], None), exclude=self._usage_exclude())

    def usage_event(self, usage: Usage) -> bytes:
        return sse_event(self._body([], usage))


class _ChatFormat(_Format):
    def _chunk(self, delta: DeltaMessage, finish_reason: str | None = None) -> bytes:
        j = self.job
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=j.id, created=j.created, model=self.model, choices=[choice])
        return sse_event(chunk, exclude=self._usage_exclude())

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        j = self.job
        choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish_reason)
        body = ChatCompletionResponse(
            id=j.id, created=j.created, model=self.model, choices=[choice], usage=usage
        )
        return body.model_dump(mode="json")

    def start_event(self) -> bytes:
        return self._chunk(DeltaMessage(role="assistant", content=""))

    def text_event(self, text: str) -> bytes:
        return self._chunk(DeltaMessage(content=text))

    def finish_event(self, finish_reason: str) -> bytes:
        return self._chunk(DeltaMessage(), finish_reason)

    def usage_event(self, usage: Usage) -> bytes:
        j = self.job
        chunk = ChatCompletionChunk(id=j.id, created=j.created, model=self.model, choices=[])
        chunk.usage = usage
        return sse_event(chunk)


def _with_source(
    job: _Job,
    *,
    prompt_text: str | None = None,
    chat_messages: tuple[ChatMessage, ...] | None = None,
) -> _Job:
    """Attach the original input to the engine request (for engines that forward text)."""
    request = replace(job.request, prompt_text=prompt_text, chat_messages=chat_messages)
    return replace(job, request=request)


# ------------------------------------------------------------------------ parsing


async def _parse(request: Request, model: type[ReqT]) -> ReqT:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None


def _encode(fn: Callable[[], Sequence[int]], param: str) -> tuple[int, ...]:
    """Tokenize; a ValueError from the tokenizer or chat template is the client's fault."""
    try:
        return tuple(fn())
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise ApiError(400, f"Could not encode the {param}: {exc}", param=param) from exc


# ------------------------------------------------------------------------ the app


def build_app(
    engine: Engine,
    *,
    served_model_id: str,
    limits: ApiLimits,
    metrics: EdgeMetrics,
    api_key: str | None = None,
) -> FastAPI:
    """The edge node's HTTP app. `metrics` is bound to `engine` (queue depth, n_layers)."""
    api = _Api(engine, served_model_id, limits, metrics, api_key)
    metrics.bind_engine(engine.queue_depth, engine.n_layers)

    app = FastAPI(title="Tandem edge node", docs_url=None, redoc_url=None)
    app.state.api = api
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_body_bytes)

    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"], include_in_schema=False)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.check_auth)])
    v1.add_api_route("/models", api.list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", api.get_model, methods=["GET"])
    v1.add_api_route("/completions", api.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", api.chat_completions, methods=["POST"])
    app.include_router(v1)
    return app
