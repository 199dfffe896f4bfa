"""Tandem on Ray Serve: the router and the edge experts as Serve deployments.

    serve run deploy.ray.app:build_app model=smollm2            # one expert
    serve run deploy.ray.app:build_app model=smollm2,gemma3     # two experts
    serve deploy deploy/ray/serve_config.yaml                   # the same, declaratively

The application (`build_app`) is one `Router` deployment (the HTTP ingress) bound to one
`EdgeExpert` deployment per model id:

- `EdgeExpert`: a real `EdgeEngine` (continuous batching, early exits) started in each replica.
  `generate(request)` is a streaming method (the router calls it with
  `handle.options(stream=True).generate.remote(...)`); `info()` answers the model's id,
  context length and layer count; `check_health()` is Serve's health check (the engine's
  worker thread must be alive). Fractional CPUs (`expert_num_cpus`, default 0.5) and
  autoscaling on ongoing requests (min 1, max `expert_max_replicas`).
- `Router`: the router's OpenAI-compatible app (`services.router.app.build_router_app`,
  unchanged: budgets, `x-tandem-*` headers, metrics, MoE² when a gate is configured) over one
  `HandleEngine` per expert. It is built when the replica starts (`@serve.ingress()` late
  binding), after asking every expert for its `info()`; each expert then has one pseudo
  replica `serve://<id>` in the router's ReplicaTable, marked healthy: Serve routes among the
  deployment's real replicas, scales them and replaces unhealthy ones, so the router does not
  probe them. Fractional CPUs (`router_num_cpus`, default 0.25) and autoscaling.

Every argument is a string on the `serve run` command line (`key=value`) or a YAML value in a
Serve config file; see `AppOptions`. Relative paths (cache_dir, gate files) are resolved
against the repository root, so every node needs the repository (and its model_cache) at the
same path, as the container images have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deploy.ray.handle_engine import (
    HandleEngine,
    chunk_to_wire,
    error_to_wire,
    messages_from_wire,
    params_from_wire,
    replica_address,
)
from tandem.runtime.engine_api import GenerationRequest

log = logging.getLogger("tandem.ray")

ROOT = Path(__file__).resolve().parents[2]


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AppOptions:
    """What `build_app` accepts (all optional)."""

    model: str = "smollm2"  # expert model ids, comma-separated
    quant: str | None = None  # per-model registry default
    tau: float | None = None  # per-model registry default
    max_batch: int = 4
    max_context: int = 1024
    threads: int = 1  # torch threads per expert replica
    cache_dir: str = "model_cache"
    device: str = "cpu"  # the cost model's device profile for every expert
    expert_num_cpus: float = 0.5
    expert_min_replicas: int = 1
    expert_max_replicas: int = 2
    expert_target_ongoing_requests: float = 2.0
    expert_max_ongoing_requests: int = 8
    expert_max_queued_requests: int = 64
    router_num_cpus: float = 0.25
    router_min_replicas: int = 1
    router_max_replicas: int = 2
    router_target_ongoing_requests: float = 16.0
    router_max_ongoing_requests: int = 64
    api_key: str | None = None  # default: $TANDEM_API_KEY
    min_ready: int = 1
    expert_info_timeout_s: float = 600.0  # how long the router waits for the experts to load
    gate: str | None = None  # MoE² ("model": "auto"): the trained gate ...
    subset_losses: str | None = None  # ... its subset-loss table ...
    feature_model: str = "smollm2"  # ... and the model whose features the gate reads

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> AppOptions:
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(
                f"unknown build_app argument(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, raw in args.items():
            if raw is None or raw == "":
                continue
            default = known[name].default
            kind = type(default) if default is not None else str
            if name == "tau":
                kind = float
            try:
                values[name] = _bool(raw) if kind is bool else kind(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"build_app argument {name}={raw!r}: {exc}") from None
        options = cls(**values)
        if options.gate and not options.subset_losses:
            raise ValueError("build_app: gate needs subset_losses too")
        if not options.models:
            raise ValueError("build_app: model must name at least one expert")
        return options

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.model.split(",") if m.strip())


# -- the expert ------------------------------------------------------------------------------


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
    max_ongoing_requests=8,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
)
class EdgeExpert:
    """One edge model in a Serve replica (see the module docstring)."""

    def __init__(
        self,
        model: str = "smollm2",
        *,
        quant: str | None = None,
        tau: float | None = None,
        max_batch: int = 4,
        max_context: int = 1024,
        threads: int = 1,
        cache_dir: str = "model_cache",
        compiled: bool | None = None,
    ) -> None:
        import os

        import torch

        from services.edge_node.main import EdgeSettings, build_engine, compile_setting
        from tandem.models.registry import ModelRegistry

        torch.set_num_threads(max(1, threads))
        registry = ModelRegistry()
        spec = registry.get(model)
        settings = EdgeSettings(
            model=model,
            quant=quant or spec.default_quant,  # type: ignore[arg-type]
            tau=spec.default_tau if tau is None else float(tau),
            host="127.0.0.1",
            port=0,
            grpc_port=0,
            max_batch=max_batch,
            max_context=max_context,
            api_key=None,
            grpc_token=None,
            cache_dir=_resolve(cache_dir),
            # None: the edge node's default (compiled unless TANDEM_COMPILE=0)
            compiled=compile_setting(os.environ.get("TANDEM_COMPILE", "1"))
            if compiled is None
            else compiled,
        )
        self.engine = build_engine(settings, registry)
        self.engine.start()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests call the class directly)
            self.replica_id = ""
        log.info("expert %s ready in replica %s", self.engine.model_id, self.replica_id)

    def _request(self, wire: Mapping[str, Any]) -> GenerationRequest:
        """The engine request for one wire request; ValueError for a malformed one."""
        if not isinstance(wire, Mapping):
            raise ValueError("the request must be a mapping")
        params = params_from_wire(wire.get("params"))
        if wire.get("messages") is not None:
            prompt_ids = self.engine.encode_chat(messages_from_wire(wire["messages"]))
        elif isinstance(wire.get("prompt"), str):
            prompt_ids = self.engine.encode_prompt(wire["prompt"])
        else:
            raise ValueError("the request needs a prompt (string) or messages")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        request_id = wire.get("request_id")
        return GenerationRequest(
            request_id=str(request_id) if request_id else os.urandom(8).hex(),
            prompt_ids=tuple(prompt_ids),
            params=params,
        )

    async def generate(self, wire: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream the request's chunks as dicts; an error ends the stream with one
        `{"error": ...}` item (never a Ray exception). Cancelling the call (the router's client
        went away) closes the engine stream, which aborts the request and frees its KV."""
        stream = None
        try:
            stream = self.engine.generate(self._request(wire))
            first = True
            async for chunk in stream:
                item = chunk_to_wire(chunk)
                if first:
                    item["replica"] = self.replica_id
                    first = False
                yield item
        except Exception as exc:
            if not isinstance(exc, ValueError):
                log.exception("expert %s: generate failed", self.engine.model_id)
            yield error_to_wire(exc)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.engine.model_id,
            "max_context": self.engine.max_context,
            "n_layers": self.engine.n_layers,
            "queue_depth": self.engine.queue_depth(),
            "replica": self.replica_id,
        }

    def check_health(self) -> None:
        """Serve's health check: the engine's worker thread must be running."""
        thread = getattr(self.engine, "_thread", None)
        if thread is None or not thread.is_alive():
            raise RuntimeError(f"the {self.engine.model_id} engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


# -- the router ------------------------------------------------------------------------------


def build_router(
    handles: Mapping[str, Any],
    infos: Mapping[str, Mapping[str, Any]],
    options: AppOptions,
    *,
    opener: Any = None,
) -> Any:
    """The router's FastAPI app over Serve experts (`handles`: expert id -> DeploymentHandle,
    `infos`: each expert's `info()`). `opener` replaces the handle call (tests)."""
    from services.router.app import build_router_app
    from services.router.experts import ExpertConfig
    from services.router.predictor import Predictor
    from services.router.profiles import DEVICE_PROFILES, ExpertSpec
    from services.router.reference import REFERENCE_TIMINGS
    from services.router.replicas import ReplicaTable
    from services.router.telemetry import LatencyTelemetry

    device = DEVICE_PROFILES[options.device]
    configs, specs = [], {}
    for expert_id, info in infos.items():
        timing = REFERENCE_TIMINGS.get(expert_id)
        if timing is None:
            raise ValueError(
                f"expert {expert_id!r} has no reference timing (services.router.reference)"
            )
        configs.append(
            ExpertConfig(
                expert_id=expert_id,
                kind="edge",
                replicas=(replica_address(expert_id),),
                device=options.device,
                max_context=int(info["max_context"]),
                decode_s_per_token=timing.decode_s_per_token,
                prefill_s_per_token=timing.prefill_s_per_token,
            )
        )
        specs[expert_id] = ExpertSpec(
            expert_id, device, timing.decode_s_per_token, timing.prefill_s_per_token
        )
    table = ReplicaTable(configs)
    for replica in table.replicas():  # the expert answered info(): Serve has it running
        table.record_success(replica)
    predictor = Predictor(specs, LatencyTelemetry())
    experts = {
        e: HandleEngine(
            e,
            table,
            handles[e],
            opener=opener,
            max_context=int(info["max_context"]),
            n_layers=int(info["n_layers"]),
        )
        for e, info in infos.items()
    }
    selector = featurizer = None
    if options.gate:
        from services.router.features import ModelFeaturizer
        from services.router.gate import Gate
        from services.router.moe2 import Moe2Selector
        from services.router.planner import SubsetLossTable

        gate = Gate.load(_resolve(options.gate))
        losses = SubsetLossTable.load(_resolve(options.subset_losses or ""))
        selector = Moe2Selector(gate, losses, predictor, table.healthy_experts)
        featurizer = ModelFeaturizer.load(
            options.feature_model, cache_dir=_resolve(options.cache_dir)
        )
    api_key = options.api_key if options.api_key is not None else os.environ.get("TANDEM_API_KEY")
    return build_router_app(
        experts,
        table,
        predictor,
        selector=selector,
        featurizer=featurizer,
        api_key=api_key or None,
        min_ready=options.min_ready,
    )


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
)
@serve.ingress()
class Router:
    """The HTTP ingress: the router's OpenAI app over the expert deployments."""

    def __init__(self, experts: dict[str, DeploymentHandle], options: dict[str, Any]) -> None:
        self.handles = dict(experts)
        self.options = AppOptions.parse(options)

    async def __serve_build_asgi_app__(self) -> Any:
        # Waits for every expert to answer (they load their models concurrently).
        async def info(expert_id: str) -> dict[str, Any]:
            return await self.handles[expert_id].info.remote()

        infos = await asyncio.wait_for(
            asyncio.gather(*(info(e) for e in self.handles)),
            timeout=self.options.expert_info_timeout_s,
        )
        return build_router(self.handles, dict(zip(self.handles, infos, strict=True)), self.options)


# -- the application -------------------------------------------------------------------------


def _autoscaling(min_r: int, max_r: int, target: float) -> dict[str, Any]:
    return {
        "min_replicas": min_r,
        "max_replicas": max(min_r, max_r),
        "target_ongoing_requests": target,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 60.0,
    }


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The Tandem Serve application (`serve run deploy.ray.app:build_app model=smollm2`)."""
    o = AppOptions.parse(args)
    experts = {}
    for model in o.models:
        deployment = EdgeExpert.options(
            name=f"expert-{model}",
            ray_actor_options={"num_cpus": o.expert_num_cpus},
            autoscaling_config=_autoscaling(
                o.expert_min_replicas, o.expert_max_replicas, o.expert_target_ongoing_requests
            ),
            max_ongoing_requests=o.expert_max_ongoing_requests,
            max_queued_requests=o.expert_max_queued_requests,
        )
        experts[model] = deployment.bind(
            model,
            quant=o.quant,
            tau=o.tau,
            max_batch=o.max_batch,
            max_context=o.max_context,
            threads=o.threads,
            cache_dir=o.cache_dir,
        )
    router = Router.options(
        name="router",
        ray_actor_options={"num_cpus": o.router_num_cpus},
        autoscaling_config=_autoscaling(
            o.router_min_replicas, o.router_max_replicas, o.router_target_ongoing_requests
        ),
        max_ongoing_requests=o.router_max_ongoing_requests,
    )
    return router.bind(experts, dict(args or {}))
