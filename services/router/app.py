"""The router's OpenAI-compatible front door (first version: concrete expert ids only).

`build_router_app(engines, table, api_key=..., min_ready=...)` returns a FastAPI app:

- GET  /health        open; 200 while the process is up
- GET  /ready         open; 503 until `table.ready(min_ready)`, then 200
- GET  /metrics       open; Prometheus text (per-expert request metrics, label `model`)
- GET  /v1/models, /v1/models/{id}   every configured expert
- POST /v1/completions, /v1/chat/completions   for a concrete expert id (stream or not)

Each POST reads the body's `model`, then hands the request to that expert's own edge-style
OpenAI app (`services.edge_node.http_api.build_app` over the expert's `Engine`, e.g. an
`ExpertEngine`), so validation, error shapes, SSE and usage are the edge node's. Every
response of a generation route carries `x-tandem-expert` (and `x-tandem-replica`, the
replica address, when the engine reports it). `"model": "auto"` (MoE² routing) is not
wired yet and answers 400. An unknown model answers OpenAI's 404 `model_not_found`.
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
from services.router.expert_engine import served
from services.router.replicas import HealthMonitor, ReplicaTable
from tandem.runtime.engine_api import Engine

AUTO_MODEL = "auto"
EXPERT_HEADER = "x-tandem-expert"
REPLICA_HEADER = "x-tandem-replica"


class _Forward(Response):
    """Run `app` (an expert's own ASGI app) on this request, replaying the body already
    read, and add the expert/replica headers to its response."""

    def __init__(self, app: Any, body: bytes, expert_id: str) -> None:
        self.app = app
        self.body_bytes = body
        self.expert_id = expert_id
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
                headers.append((EXPERT_HEADER.encode(), self.expert_id.encode()))
                if "replica" in holder:
                    headers.append((REPLICA_HEADER.encode(), holder["replica"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = served.set(holder)
        try:
            await self.app(dict(scope), replay, tagged_send)
        finally:
            served.reset(token)


class _Router:
    def __init__(
        self,
        engines: Mapping[str, Engine],
        table: ReplicaTable,
        api_key: str | None,
        min_ready: int,
        limits: ApiLimits,
        registry: CollectorRegistry,
    ) -> None:
        self.engines = dict(engines)
        self.table = table
        self.api_key = api_key
        self.min_ready = min_ready
        self.registry = registry
        self.started = int(time.time())
        self.apps = {
            expert_id: build_app(
                engine,
                served_model_id=expert_id,
                limits=limits,
                metrics=EdgeMetrics(
                    registry, model_name=expert_id, namespace=_namespace(expert_id)
                ),
            )
            for expert_id, engine in self.engines.items()
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
            return _Forward(self.apps[first], body, first)
        if model == AUTO_MODEL:
            raise ApiError(
                400,
                'Automatic expert selection ("model": "auto", MoE² routing) is not '
                "available yet; ask for one of the expert ids listed by /v1/models.",
                param="model",
                code="model_auto_not_supported",
            )
        app = self.apps.get(model)
        if app is None:
            raise model_not_found(model)
        return _Forward(app, body, model)


def _namespace(expert_id: str) -> str:
    """Metric namespace of one expert (EdgeMetrics registers fixed metric names, so experts
    sharing a registry need distinct namespaces)."""
    return "tandem_router_" + re.sub(r"[^a-zA-Z0-9_]", "_", expert_id)


def build_router_app(
    engines: Mapping[str, Engine],
    table: ReplicaTable,
    *,
    api_key: str | None = None,
    min_ready: int = 1,
    limits: ApiLimits | None = None,
    registry: CollectorRegistry | None = None,
    monitor: HealthMonitor | None = None,
) -> FastAPI:
    """The router's HTTP app over `engines` (expert id -> Engine). With `monitor`, the app's
    lifespan starts and stops it; engines with an async `close()` are closed on shutdown."""
    limits = limits or ApiLimits()
    router = _Router(engines, table, api_key, min_ready, limits, registry or CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if monitor is not None:
            await monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                await monitor.stop()
            for engine in router.engines.values():
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
