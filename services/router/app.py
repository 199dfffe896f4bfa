"""The router's OpenAI-compatible front door.

`build_router_app(experts, table, predictor, selector=..., featurizer=..., ...)` returns a
FastAPI app:

- GET  /health        open; 200 while the process is up
- GET  /ready         open; 503 until `table.ready(min_ready)`, then 200
- GET  /metrics       open; Prometheus text (router metrics + per-model-id request metrics)
- GET  /v1/models, /v1/models/{id}   every configured expert, and "auto" when MoE² is set up
- POST /v1/completions, /v1/chat/completions   for an expert id or "auto" (stream or not)

Each POST reads the body's `model` and the request's budgets (`services.router.budget`:
body fields or headers, else the server defaults; malformed -> 400), then hands the request to
that model id's own edge-style OpenAI app (`tandem.api.app.build_app` over a
`RoutedEngine`), so validation, error shapes, SSE and usage are the edge node's. The routed
engine fills in a `RouteReport`, which comes back in `usage.tandem.router` and in the
`x-tandem-*` headers (`services.router.report`), plus `x-tandem-replica` (the replica address
of the last expert call). An unknown model answers OpenAI's 404 `model_not_found`; "auto"
without a gate answers 400.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic.json_schema import models_json_schema
from starlette.types import Message, Receive, Scope, Send

from services.router.admission import Admission, AdmissionLimits
from services.router.budget import (
    BEST_EFFORT_FIELD,
    BEST_EFFORT_HEADER,
    ENERGY_FIELD,
    ENERGY_HEADER,
    LATENCY_FIELD,
    LATENCY_HEADER,
    TOP_K_FIELD,
    TOP_K_HEADER,
    BudgetDefaults,
    parse_budget,
)
from services.router.expert_engine import served
from services.router.features import Featurizer
from services.router.metrics import RouterMetrics
from services.router.moe2 import Moe2Selector
from services.router.predictor import Predictor
from services.router.replicas import HealthMonitor, ReplicaTable
from services.router.report import EXPERT_HEADER
from services.router.routed_engine import RouteContext, RoutedEngine, route_context
from services.router.self_score import SelfScorePicks
from services.router.token_mixture import TokenMixer
from tandem.api.app import build_app
from tandem.api.auth import check_api_key
from tandem.api.body_limit import BodySizeLimitMiddleware
from tandem.api.errors import (
    ApiError,
    install_error_handlers,
    model_not_found,
)
from tandem.api.limits import ApiLimits
from tandem.api.metrics import ApiMetrics
from tandem.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from tandem.runtime.engine_api import Engine

AUTO_MODEL = "auto"
REPLICA_HEADER = "x-tandem-replica"


class _Forward(Response):
    """Run `app` (a model id's own ASGI app) on this request, replaying the body already
    read, with the request's `RouteContext` set, and add the route headers to its response."""

    def __init__(
        self,
        app: Any,
        body: bytes,
        model: str,
        ctx: RouteContext | None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.body_bytes = body
        self.model = model
        self.ctx = ctx
        self.on_done = on_done  # frees the admission slot once the response has ended
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder: dict[str, str] = {}
        replayed = False
        on_done, self.on_done = self.on_done, None

        def done() -> None:
            nonlocal on_done
            if on_done is not None:
                on_done, callback = None, on_done
                callback()

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self.body_bytes, "more_body": False}
            return await receive()

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                report = self.ctx.report if self.ctx is not None else None
                extra = report.headers(final=not self.ctx.stream) if report is not None else {}
                if report is None and self.model != AUTO_MODEL:
                    extra[EXPERT_HEADER] = self.model
                headers.extend((k.encode(), v.encode()) for k, v in extra.items())
                if "replica" in holder:
                    headers.append((REPLICA_HEADER.encode(), holder["replica"].encode()))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done()  # the client has the whole answer: free the slot before cleanup

        token = served.set(holder)
        ctx_token = route_context.set(self.ctx)
        try:
            await self.app(dict(scope), replay, tagged_send)
        finally:
            route_context.reset(ctx_token)
            served.reset(token)
            done()


class _Router:
    def __init__(
        self,
        routes: Mapping[str, RoutedEngine],
        table: ReplicaTable,
        api_key: str | None,
        min_ready: int,
        limits: ApiLimits,
        registry: CollectorRegistry,
        budget_defaults: BudgetDefaults,
        admission: Admission,
    ) -> None:
        self.engines = dict(routes)
        self.admission = admission
        self.table = table
        self.api_key = api_key
        self.min_ready = min_ready
        self.registry = registry
        self.budget_defaults = budget_defaults
        self.started = int(time.time())
        self.apps = {
            model: build_app(
                engine,
                served_model_id=model,
                limits=limits,
                metrics=ApiMetrics(registry, model_name=model, namespace=_namespace(model)),
            )
            for model, engine in self.engines.items()
        }

    async def check_auth(self, request: Request) -> None:
        check_api_key(request, self.api_key)

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        healthy = list(self.table.healthy_experts())
        ok = self.table.ready(self.min_ready)
        body = {
            "status": "ready" if ok else "not_ready",
            "healthy_experts": healthy,
            "min_ready": self.min_ready,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _card(self, expert_id: str) -> ModelCard:
        engine = self.engines[expert_id]
        return ModelCard(
            id=expert_id, created=self.started, owned_by="tandem", max_model_len=engine.max_context
        )

    async def list_models(self) -> JSONResponse:
        cards = [self._card(e) for e in self.engines]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    async def get_model(self, model: str) -> JSONResponse:
        if model not in self.engines:
            raise model_not_found(model)
        return JSONResponse(self._card(model).model_dump(mode="json"))

    async def generate(self, request: Request) -> Response:
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str):
            # Let an expert's app produce the exact validation error, if there is one.
            if not self.apps:
                raise ApiError(400, "The request body must name a model.", param="model")
            first = next(iter(self.apps))
            return _Forward(self.apps[first], body, first, None)
        app = self.apps.get(model)
        if app is None and model == AUTO_MODEL:
            raise ApiError(
                400,
                'Automatic expert selection ("model": "auto") is not configured on this '
                "router (it has no gate); ask for one of the ids listed by /v1/models.",
                param="model",
                code="model_auto_not_supported",
            )
        if app is None:
            raise model_not_found(model)
        assert isinstance(data, dict)
        budget = parse_budget(data, request.headers, self.budget_defaults)
        ctx = RouteContext(budget, stream=data.get("stream") is True)
        client = self.admission.client_of(request, self.api_key is not None)
        self.admission.acquire(client)  # 429 + Retry-After when full
        return _Forward(app, body, model, ctx, lambda: self.admission.release(client))


def _namespace(expert_id: str) -> str:
    """Metric namespace of one expert (ApiMetrics registers fixed metric names, so experts
    sharing a registry need distinct namespaces)."""
    return "tandem_router_" + re.sub(r"[^a-zA-Z0-9_]", "_", expert_id)


# ------------------------------------------------------------------------ OpenAPI

_REF = "#/components/schemas/{model}"
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "Invalid request (body, parameters, budgets) or infeasible budget",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body over the limit",
    "429": "Overloaded; retry after Retry-After seconds",
}
# Budgets (services.router.budget): a number (strings are parsed, as headers are), a flag
# (true/false or one of its spellings), an integer 1..max_top_k.
_NUMBER_TEXT = {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$"}
_FLAG_TEXT = {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no", "on", "off"]}


def _budget_schemas(max_top_k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(body properties, header schemas) of the budgets."""
    number = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, _NUMBER_TEXT]}
    flag = {"anyOf": [{"type": "boolean"}, _FLAG_TEXT]}
    top_k = {"type": "integer", "minimum": 1, "maximum": max_top_k}
    k_text = {"type": "string", "enum": [str(k) for k in range(1, max_top_k + 1)]}
    nullable = {"type": "null"}
    body = {
        LATENCY_FIELD: {"anyOf": [*number["anyOf"], nullable], "description": "ms"},
        ENERGY_FIELD: {"anyOf": [*number["anyOf"], nullable], "description": "joules"},
        BEST_EFFORT_FIELD: {"anyOf": [*flag["anyOf"], nullable]},
        TOP_K_FIELD: {"anyOf": [top_k, k_text, nullable]},
    }
    headers = {
        LATENCY_HEADER: _NUMBER_TEXT,
        ENERGY_HEADER: _NUMBER_TEXT,
        BEST_EFFORT_HEADER: _FLAG_TEXT,
        TOP_K_HEADER: k_text,
    }
    return body, headers


def _error_responses(*statuses: str) -> dict[str, Any]:
    """OpenAPI `responses` entries for `statuses`, each in OpenAI's error shape."""
    error = {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}
    return {s: {"description": _ERRORS[s], "content": error} for s in statuses}


def _honoured(limits: ApiLimits) -> dict[str, Any]:
    """Schemas of the fields whose accepted values are narrower than their type: the
    explicit limits, and the OpenAI fields accepted only at their no-op value."""
    count = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": limits.max_tokens_cap}]}
    count["anyOf"].append({"type": "null"})
    return {
        "max_tokens": count,
        "max_completion_tokens": count,
        "stop": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "maxItems": limits.max_stop,
                },
                {"type": "null"},
            ]
        },
        "n": {"type": "integer", "enum": [1]},
        "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
        "echo": {"type": "boolean", "enum": [False]},
        "logprobs": {"type": "null"},
        "best_of": {"type": ["integer", "null"], "enum": [1, None]},
        "suffix": {"type": ["string", "null"], "maxLength": 0},
        "top_logprobs": {"type": ["integer", "null"], "enum": [0, None]},
        "tools": {"type": ["array", "null"], "maxItems": 0},
        "response_format": {
            "anyOf": [
                {"type": "object", "properties": {"type": {"enum": ["text"]}}},
                {"type": "null"},
            ]
        },
    }


def _openapi_docs(
    model_ids: list[str], limits: ApiLimits, max_top_k: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(route path -> `openapi_extra` for the generation routes, component schemas).

    The generation handlers read the raw body (to route on `model` before validating), so
    FastAPI cannot see their request models; this describes them: the body is the edge
    node's request model plus the router's budget fields (with `model` one of `model_ids`),
    the budget headers, the 200 bodies (JSON, or SSE when streaming) and the error shape.
    Fields are narrowed to the values this server accepts (`_honoured`)."""
    models = [
        (CompletionRequest, "validation"),
        (ChatCompletionRequest, "validation"),
        (CompletionResponse, "serialization"),
        (ChatCompletionResponse, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = dict(top["$defs"])
    schemas["Error"] = _ERROR_SCHEMA
    # Content may be left out (or null) only by the assistant.
    message = schemas["ChatMessageIn"]
    schemas["ChatMessageIn"] = {
        **message,
        "anyOf": [
            {"properties": {"role": {"const": "assistant"}}},
            {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        ],
    }
    budget_body, budget_headers = _budget_schemas(max_top_k)
    extras: dict[str, dict[str, Any]] = {}
    honoured = _honoured(limits)
    for path, request, response in (
        ("/v1/completions", "CompletionRequest", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse"),
    ):
        base = schemas[request]
        name = "Router" + request
        schemas[name] = {
            **base,
            "title": name,
            "properties": {
                **base["properties"],
                **{k: v for k, v in honoured.items() if k in base["properties"]},
                "model": {"type": "string", "enum": model_ids},
                **budget_body,
            },
        }
        responses: dict[str, Any] = {
            "200": {
                "description": "The completion (JSON), or its SSE stream when stream=true",
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=response)}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        }
        responses.update(_error_responses(*_ERRORS))
        extras[path] = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=name)}}},
            },
            "parameters": [
                {"name": h, "in": "header", "required": False, "schema": schema}
                for h, schema in budget_headers.items()
            ],
            "responses": responses,
        }
    return extras, schemas


def build_router_app(
    experts: Mapping[str, Engine],
    table: ReplicaTable,
    predictor: Predictor,
    *,
    selector: Moe2Selector | None = None,
    featurizer: Featurizer | None = None,
    budget_defaults: BudgetDefaults | None = None,
    api_key: str | None = None,
    min_ready: int = 1,
    limits: ApiLimits | None = None,
    registry: CollectorRegistry | None = None,
    monitor: HealthMonitor | None = None,
    admission: AdmissionLimits | None = None,
    picks: SelfScorePicks | None = None,
) -> FastAPI:
    """The router's HTTP app over `experts` (expert id -> Engine, e.g. `ExpertEngine`), with
    MoE² as model "auto" when `selector` (and the `featurizer` its gate needs) is given.
    `predictor` prices every expert (each needs an `ExpertSpec`). With `monitor`, the app's
    lifespan starts and stops it; experts with an async `close()` are closed on shutdown."""
    limits = limits or ApiLimits()
    registry = registry or CollectorRegistry()
    budget_defaults = budget_defaults or BudgetDefaults()
    missing = sorted(set(experts) - set(predictor.specs))
    if missing:
        raise ValueError(f"no cost profile (ExpertSpec) for experts {missing}")
    metrics = RouterMetrics(registry)
    metrics.watch(selector, predictor.telemetry)
    common = {"defaults": budget_defaults, "metrics": metrics}
    routes = {e: RoutedEngine(e, experts, predictor, **common) for e in experts}
    if selector is not None:
        routes[AUTO_MODEL] = RoutedEngine(
            AUTO_MODEL,
            experts,
            predictor,
            selector=selector,
            featurizer=featurizer,
            mixer=TokenMixer.from_registry(list(experts)),  # k > 1 on one tokenizer
            picks=picks,  # k > 1 across tokenizers: the experts' prompt scores pick
            **common,
        )
    gate = Admission(admission or AdmissionLimits())
    metrics.watch_admission(gate)
    router = _Router(routes, table, api_key, min_ready, limits, registry, budget_defaults, gate)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if monitor is not None:
            await monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                await monitor.stop()
            for engine in experts.values():
                close = getattr(engine, "close", None)
                if close is not None:
                    await close()

    app = FastAPI(title="Tandem router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_api_route("/health", router.health, methods=["GET"])
    app.add_api_route("/ready", router.ready, methods=["GET"])
    app.add_api_route("/metrics", router.prometheus, methods=["GET"], include_in_schema=False)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(router.check_auth)])
    v1.add_api_route(
        "/models", router.list_models, methods=["GET"], responses=_error_responses("401")
    )
    v1.add_api_route(
        "/models/{model:path}",
        router.get_model,
        methods=["GET"],
        responses=_error_responses("401", "404"),
    )
    extras, schemas = _openapi_docs(list(routes), limits, budget_defaults.max_top_k)
    for path in ("/completions", "/chat/completions"):
        v1.add_api_route(
            path, router.generate, methods=["POST"], openapi_extra=extras["/v1" + path]
        )
    app.include_router(v1)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generated()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    return app
