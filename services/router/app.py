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
that model id's own edge-style OpenAI app (`services.edge_node.http_api.build_app` over a
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
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Message, Receive, Scope, Send

from services.edge_node.body_limit import BodySizeLimitMiddleware
from services.edge_node.errors import (
    ApiError,
    install_error_handlers,
    model_not_found,
)
from services.edge_node.http_api import ApiLimits, build_app, check_api_key
from services.edge_node.metrics import EdgeMetrics
from services.edge_node.protocol import ModelCard, ModelList
from services.router.budget import BudgetDefaults, parse_budget
from services.router.expert_engine import served
from services.router.features import Featurizer
from services.router.metrics import RouterMetrics
from services.router.moe2 import Moe2Selector
from services.router.predictor import Predictor
from services.router.replicas import HealthMonitor, ReplicaTable
from services.router.report import EXPERT_HEADER
from services.router.routed_engine import RouteContext, RoutedEngine, route_context
from tandem.runtime.engine_api import Engine

AUTO_MODEL = "auto"
REPLICA_HEADER = "x-tandem-replica"


class _Forward(Response):
    """Run `app` (a model id's own ASGI app) on this request, replaying the body already
    read, with the request's `RouteContext` set, and add the route headers to its response."""

    def __init__(self, app: Any, body: bytes, model: str, ctx: RouteContext | None) -> None:
        self.app = app
        self.body_bytes = body
        self.model = model
        self.ctx = ctx
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder: dict[str, str] = {}
        replayed = False

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

        token = served.set(holder)
        ctx_token = route_context.set(self.ctx)
        try:
            await self.app(dict(scope), replay, tagged_send)
        finally:
            route_context.reset(ctx_token)
            served.reset(token)


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
    ) -> None:
        self.engines = dict(routes)
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
                metrics=EdgeMetrics(registry, model_name=model, namespace=_namespace(model)),
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
        return _Forward(app, body, model, RouteContext(budget, stream=data.get("stream") is True))


def _namespace(expert_id: str) -> str:
    """Metric namespace of one expert (EdgeMetrics registers fixed metric names, so experts
    sharing a registry need distinct namespaces)."""
    return "tandem_router_" + re.sub(r"[^a-zA-Z0-9_]", "_", expert_id)


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
            AUTO_MODEL, experts, predictor, selector=selector, featurizer=featurizer, **common
        )
    router = _Router(routes, table, api_key, min_ready, limits, registry, budget_defaults)

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
    v1.add_api_route("/models", router.list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", router.get_model, methods=["GET"])
    v1.add_api_route("/completions", router.generate, methods=["POST"])
    v1.add_api_route("/chat/completions", router.generate, methods=["POST"])
    app.include_router(v1)
    return app
