"""The OpenAI-compatible HTTP app over any `Engine` (the edge node serves its EdgeEngine with
it; the router one app per model id over its RoutedEngine).

`build_app(engine, served_model_id=..., limits=ApiLimits(), metrics=ApiMetrics(...))`
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

import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem.api.auth import check_api_key
from tandem.api.body_limit import BodySizeLimitMiddleware
from tandem.api.errors import (
    ApiError,
    BodyTooLarge,
    context_length_exceeded,
    install_error_handlers,
    model_not_found,
    overloaded,
)
from tandem.api.formats import ChatFormat, CompletionFormat, Format
from tandem.api.job import Job, with_source
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tandem.api.output import Output
from tandem.api.parse import encode_prompt, parse_body
from tandem.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from tandem.api.sse import (
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

CLIENT_CLOSED = 499  # status recorded in metrics when the client left (nginx convention)


class _Api:
    def __init__(
        self,
        engine: Engine,
        served_model_id: str,
        limits: ApiLimits,
        metrics: ApiMetrics,
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
            req = await parse_body(request, CompletionRequest)
            self._check_model(req.model)
            prompt_ids = encode_prompt(lambda: self.engine.encode_prompt(req.prompt_text), "prompt")
            job = self._job("cmpl", req, prompt_ids, req.max_tokens, "max_tokens", "prompt")
            job = with_source(job, prompt_text=req.prompt_text)
        except (ApiError, BodyTooLarge) as exc:
            self.metrics.record_rejected(getattr(exc, "status", 413))
            raise
        if job.stream:
            return await self._stream(request, job, CompletionFormat(job, self.model_id))
        return await self._complete(request, job, CompletionFormat(job, self.model_id))

    async def chat_completions(self, request: Request) -> Response:
        try:
            req = await parse_body(request, ChatCompletionRequest)
            self._check_model(req.model)
            messages = [ChatMessage(role=m.engine_role, content=m.text) for m in req.messages]
            prompt_ids = encode_prompt(lambda: self.engine.encode_chat(messages), "messages")
            job = self._job(
                "chatcmpl",
                req,
                prompt_ids,
                req.requested_max_tokens,
                req.max_tokens_param,
                "messages",
            )
            job = with_source(job, chat_messages=tuple(messages))
        except (ApiError, BodyTooLarge) as exc:
            self.metrics.record_rejected(getattr(exc, "status", 413))
            raise
        if job.stream:
            return await self._stream(request, job, ChatFormat(job, self.model_id))
        return await self._complete(request, job, ChatFormat(job, self.model_id))

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
    ) -> Job:
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
        return Job(
            id=rid,
            created=int(time.time()),
            request=GenerationRequest(request_id=rid, prompt_ids=prompt_ids, params=params),
            prompt_param=prompt_param,
            max_tokens=max_tokens,
            stream=req.stream,
            include_usage=req.include_usage,
        )

    def _engine_error(self, exc: Exception, job: Job) -> ApiError:
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

    async def _complete(self, request: Request, job: Job, fmt: Format) -> Response:
        recorder = self.metrics.start_request()
        out = Output(prompt_tokens=len(job.request.prompt_ids))
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

    async def _stream(self, request: Request, job: Job, fmt: Format) -> Response:
        recorder = self.metrics.start_request()
        out = Output(prompt_tokens=len(job.request.prompt_ids))
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


# ------------------------------------------------------------------------ the app


def build_app(
    engine: Engine,
    *,
    served_model_id: str,
    limits: ApiLimits,
    metrics: ApiMetrics,
    api_key: str | None = None,
) -> FastAPI:
    """The OpenAI HTTP app over `engine`. `metrics` is bound to `engine` (queue depth, n_layers)."""
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
