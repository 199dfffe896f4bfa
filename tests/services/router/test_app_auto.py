"""`"model": "auto"` through the router's HTTP front door with the official `openai` client:
budgets in extra_body and headers, the usage extension and the x-tandem-* headers, streaming
with usage, and the 400s for malformed or infeasible budgets. The experts are FakeEngines
behind the router (no models; test_router_real_models.py has the real ones)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from services.router.app import build_router_app
from services.router.budget import BudgetDefaults
from services.router.experts import ExpertConfig
from services.router.replicas import ReplicaTable
from tests.api.fakes import FakeEngine
from tests.api.live_server import live_server
from tests.services.router.moe2_fixtures import ClusterFeaturizer, selector
from tests.services.router.test_gate import EXPERTS
from tests.services.router.test_routed_engine import REPLIES


@contextmanager
def router(defaults: BudgetDefaults | None = None) -> Iterator[openai.OpenAI]:
    experts = {e: FakeEngine(reply=REPLIES[e], model_id=e, max_context=4096) for e in EXPERTS}
    table = ReplicaTable([ExpertConfig(e, "edge", ("127.0.0.1:1",), "cpu") for e in EXPERTS])
    sel = selector()
    app = build_router_app(
        experts,
        table,
        sel.predictor,
        selector=sel,
        featurizer=ClusterFeaturizer(),
        budget_defaults=defaults,
    )
    with live_server(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=10)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_auto_reports_experts_energy_and_latency_in_usage_and_headers() -> None:
    with router() as oc:
        raw = oc.chat.completions.with_raw_response.create(
            model="auto",
            messages=chat("tell me a story"),
            max_tokens=16,
            extra_body={"latency_ms": 60000, "energy_j": 500},
        )
        resp = raw.parse()
        assert resp.model == "auto"
        assert resp.choices[0].message.content == REPLIES["prose_pro"]
        r = resp.usage.model_extra["tandem"]["router"]
        assert r["selection"] == "auto" and r["answered_by"] == "prose_pro"
        assert r["budget"] == {
            "latency_ms": 60000.0,
            "energy_j": 500.0,
            "best_effort": False,
            "top_k": 1,
        }
        assert r["energy_j"] > 0 and r["latency_predicted_ms"] > 0 and r["latency_ms"] > 0
        h = raw.headers
        assert h["x-tandem-expert"] == "prose_pro" and h["x-tandem-experts"] == "prose_pro"
        assert float(h["x-tandem-energy-j"]) == pytest.approx(r["energy_j"], rel=1e-5)
        assert float(h["x-tandem-latency-ms"]) == pytest.approx(r["latency_ms"], abs=0.1)
        assert float(h["x-tandem-latency-predicted-ms"]) > 0
        assert h["x-tandem-budget-met"] == "true"

        # Budgets in headers work too; a code prompt goes to the code expert.
        code = oc.completions.create(
            model="auto",
            prompt="python code: def f",
            max_tokens=16,
            extra_headers={"x-tandem-latency-ms": "60000", "x-tandem-top-k": "2"},
        )
        r = code.usage.model_extra["tandem"]["router"]
        assert r["budget"]["latency_ms"] == 60000.0 and r["budget"]["top_k"] == 2
        assert code.choices[0].text == REPLIES["code_pro"]


def test_auto_streams_with_the_report_in_the_usage_chunk() -> None:
    with router() as oc:
        with oc.chat.completions.with_streaming_response.create(
            model="auto",
            messages=chat("write python code"),
            stream=True,
            stream_options={"include_usage": True},
        ) as raw:
            assert raw.headers["x-tandem-expert"] == "code_pro"
            assert "x-tandem-latency-ms" not in raw.headers  # not known when headers go out
            chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == REPLIES["code_pro"]
        r = chunks[-1].usage.model_extra["tandem"]["router"]
        assert r["answered_by"] == "code_pro" and r["latency_ms"] > 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"latency_ms": -5}, "latency_ms"),
        ({"energy_j": "lots"}, "energy_j"),
        ({"best_effort": "maybe"}, "best_effort"),
        ({"top_k": 9}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_malformed_budgets_are_400_naming_the_field(extra: dict, param: str) -> None:
    with router() as oc:
        with pytest.raises(openai.BadRequestError) as exc:
            oc.chat.completions.create(model="auto", messages=chat("hi"), extra_body=extra)
        assert exc.value.param == param


def test_infeasible_budget_is_400_unless_best_effort() -> None:
    with router() as oc:
        with pytest.raises(openai.BadRequestError) as exc:
            oc.chat.completions.create(
                model="auto", messages=chat("hi"), extra_body={"latency_ms": 1}
            )
        assert exc.value.code == "budget_infeasible" and exc.value.param == "latency_ms"
        raw = oc.chat.completions.with_raw_response.create(
            model="auto", messages=chat("hi"), extra_body={"latency_ms": 1, "best_effort": True}
        )
        assert raw.headers["x-tandem-budget-met"] == "false"
        assert raw.parse().choices[0].message.content in REPLIES.values()
        # A named expert is held to the budget as well.
        with pytest.raises(openai.BadRequestError) as exc:
            oc.chat.completions.create(
                model="code_pro", messages=chat("hi"), extra_body={"energy_j": 1e-4}
            )
        assert exc.value.code == "budget_infeasible" and exc.value.param == "energy_j"


def test_server_default_budget_applies_and_client_can_override() -> None:
    with router(BudgetDefaults(latency_ms=1)) as oc:
        with pytest.raises(openai.BadRequestError):
            oc.chat.completions.create(model="auto", messages=chat("hi"))
        ok = oc.chat.completions.create(
            model="auto", messages=chat("hi"), extra_body={"latency_ms": 60000}
        )
        assert ok.choices[0].message.content


def test_models_lists_auto_and_metrics_count_routes() -> None:
    with router() as oc:
        assert [m.id for m in oc.models.list()] == [*EXPERTS, "auto"]
        oc.chat.completions.create(model="auto", messages=chat("tell me a story"))
        base = str(oc.base_url).removesuffix("/v1/")
        text = httpx.get(f"{base}/metrics").text
        assert 'tandem_router_routed_total{expert="prose_pro",selection="auto"} 1.0' in text
        assert "tandem_router_selection_solves_total 1.0" in text
        assert 'tandem_router_latency_correction{expert="prose_pro"}' in text
