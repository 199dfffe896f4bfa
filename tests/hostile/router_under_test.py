"""The real router app (`services.router.app.build_router_app`) over FakeEngines and the MoE²
test world (three synthetic experts, a trained gate, "auto"), served by uvicorn on loopback.
Used by the hostile-input tests: every byte goes through the real middleware, parsing,
validation, budgets, routing and the experts' edge-style apps; only generation is fake."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from services.router.app import build_router_app
from services.router.budget import BudgetDefaults
from services.router.experts import ExpertConfig
from services.router.gate import Gate
from services.router.moe2 import Moe2Selector
from services.router.planner import SubsetLossTable
from services.router.replicas import ReplicaTable
from tandem.api.limits import ApiLimits
from tests.api.fakes import FakeEngine
from tests.api.live_server import live_server
from tests.services.router.moe2_fixtures import ClusterFeaturizer, predictor, trained_gate
from tests.services.router.test_gate import EXPERTS
from tests.services.router.test_routed_engine import REPLIES

# Small, explicit limits so that "over the limit" is cheap to send.
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens_cap=256, max_stop=4)
MAX_CONTEXT = 4096


@functools.cache
def _gate() -> tuple[Gate, SubsetLossTable]:
    return trained_gate()  # seconds of training: once per process


@dataclass
class RouterUnderTest:
    app: FastAPI
    experts: dict[str, FakeEngine]


def make_router(
    limits: ApiLimits = LIMITS, api_key: str | None = None, **engine_kw: object
) -> RouterUnderTest:
    experts = {
        e: FakeEngine(reply=REPLIES[e], model_id=e, max_context=MAX_CONTEXT, **engine_kw)  # type: ignore[arg-type]
        for e in EXPERTS
    }
    table = ReplicaTable([ExpertConfig(e, "edge", ("127.0.0.1:1",), "cpu") for e in EXPERTS])
    for replica in table.replicas():  # as if the health monitor had probed them: /ready 200
        table.record_success(replica)
    gate, losses = _gate()
    sel = Moe2Selector(gate, losses, predictor(), lambda: set(EXPERTS))
    app = build_router_app(
        experts,
        table,
        sel.predictor,
        selector=sel,
        featurizer=ClusterFeaturizer(),
        budget_defaults=BudgetDefaults(),
        api_key=api_key,
        limits=limits,
    )
    return RouterUnderTest(app, experts)


@contextmanager
def live_router(**kw: object) -> Iterator[tuple[str, RouterUnderTest]]:
    """(base URL, the router) with the router served on 127.0.0.1."""
    rut = make_router(**kw)  # type: ignore[arg-type]
    with live_server(rut.app) as base:
        yield base, rut
