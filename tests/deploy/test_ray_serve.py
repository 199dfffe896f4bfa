"""The Ray Serve application (deploy/ray/).

Fast tests (no Ray cluster): the handle wire format, `HandleEngine`'s error mapping, the
router app over fake expert handles, and the application's Serve options (fractional CPUs,
autoscaling) and config file.

Slow test: the whole application on a local Ray (2 CPUs, no dashboard) with the smallest model
(smollm2), driven over HTTP through Serve's proxy with httpx and the official openai client.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from deploy.ray import app as ray_app  # noqa: E402
from deploy.ray.handle_engine import (  # noqa: E402
    ExpertFailed,
    HandleEngine,
    chunk_from_wire,
    chunk_to_wire,
    error_to_wire,
    params_from_wire,
    request_to_wire,
)
from services.router.expert_engine import ExpertUnavailable, served  # noqa: E402
from services.router.experts import ExpertConfig  # noqa: E402
from services.router.replicas import ReplicaTable  # noqa: E402
from tandem.launch import free_port  # noqa: E402
from tandem.runtime.engine_api import (  # noqa: E402
    ChatMessage,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
)
from tandem.runtime.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "ray" / "serve_config.yaml"


# -- fakes -----------------------------------------------------------------------------------


class FakeStream:
    """What `handle.options(stream=True).generate.remote()` returns: async-iterable,
    cancel()-able."""

    def __init__(self, items: list[Any], fail: BaseException | None = None) -> None:
        self.items = list(items)
        self.fail = fail
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self.items:
            return self.items.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def chunks(text: str, prompt_tokens: int = 5) -> list[dict[str, Any]]:
    words = text.split(" ")
    out = []
    for i, w in enumerate(words):
        last = i == len(words) - 1
        c = GenerationChunk(
            text=w if i == 0 else " " + w,
            token_ids=(i,),
            exit_layers=(30,),
            prompt_tokens=prompt_tokens,
            completion_tokens=i + 1,
            finish_reason="stop" if last else None,
            sources=("edge",),
        )
        out.append(chunk_to_wire(c))
    out[0]["replica"] = "abc123"
    return out


def table(expert: str = "smollm2") -> ReplicaTable:
    t = ReplicaTable(
        [ExpertConfig(expert_id=expert, kind="edge", replicas=(f"serve://{expert}",), device="cpu")]
    )
    for r in t.replicas():
        t.record_success(r)
    return t


def request(**kw: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        prompt_ids=(0, 0, 0),
        params=SamplingParams(max_tokens=8, temperature=0.0, stop=("\n",)),
        **({"prompt_text": "Hello"} | kw),
    )


async def collect(engine: HandleEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(req)]


# -- the wire format -------------------------------------------------------------------------


def test_wire_round_trip() -> None:
    chat = request(prompt_text=None, chat_messages=(ChatMessage("user", "hi"),))
    wire = request_to_wire(chat)
    assert wire == {
        "request_id": "r1",
        "params": {
            "max_tokens": 8,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": None,
            "stop": ["\n"],
            "ignore_eos": False,
        },
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert params_from_wire(wire["params"]) == chat.params
    assert request_to_wire(request())["prompt"] == "Hello"
    c = GenerationChunk("a", (1,), (30,), 3, 1, "stop", ("edge",))
    assert chunk_from_wire(chunk_to_wire(c)) == c
    with pytest.raises(ValueError):
        request_to_wire(request(prompt_text=None))


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": -1},
        {"max_tokens": "8"},
        {"temperature": float("nan")},
        {"nope": 1},
        {"stop": [1]},
        "x",
    ],
)
def test_bad_params_are_value_errors(params: Any) -> None:
    with pytest.raises(ValueError):
        params_from_wire(params)


def test_errors_cross_the_wire_as_kinds() -> None:
    assert error_to_wire(PromptTooLong("long"))["error"]["kind"] == "prompt_too_long"
    assert error_to_wire(ValueError("bad"))["error"] == {"kind": "invalid", "message": "bad"}
    assert error_to_wire(EngineOverloaded("busy"))["error"]["kind"] == "overloaded"
    assert error_to_wire(RuntimeError("boom"))["error"]["kind"] == "internal"


# -- HandleEngine ----------------------------------------------------------------------------


def engine_over(stream: FakeStream, seen: list[dict] | None = None) -> HandleEngine:
    def opener(wire: dict) -> FakeStream:
        if seen is not None:
            seen.append(wire)
        return stream

    return HandleEngine("smollm2", table(), handle=None, opener=opener, max_context=1024)


def test_handle_engine_streams_and_names_the_replica() -> None:
    seen: list[dict] = []
    engine = engine_over(FakeStream(chunks("the answer is 42")), seen)
    holder: dict[str, str] = {}
    token = served.set(holder)
    try:
        out = asyncio.run(collect(engine, request()))
    finally:
        served.reset(token)
    assert "".join(c.text for c in out) == "the answer is 42"
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 4
    assert seen[0]["prompt"] == "Hello"
    assert holder["replica"] == "serve://smollm2/abc123"
    assert engine.queue_depth() == 0  # the in-flight count is released


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"error": {"kind": "invalid", "message": "bad", "param": "messages"}}, ValueError),
        ({"error": {"kind": "prompt_too_long", "message": "long"}}, PromptTooLong),
        ({"error": {"kind": "overloaded", "message": "busy"}}, EngineOverloaded),
        ({"error": {"kind": "internal", "message": "boom"}}, ExpertFailed),
    ],
)
def test_handle_engine_raises_the_experts_error(item: dict, expected: type) -> None:
    with pytest.raises(expected) as info:
        asyncio.run(collect(engine_over(FakeStream([item])), request()))
    if expected is ValueError:
        assert info.value.param == "messages"


def test_ray_failures_before_the_first_chunk_are_unavailable() -> None:
    from ray.serve.exceptions import BackPressureError

    stream = FakeStream([], fail=BackPressureError(num_queued_requests=3, max_queued_requests=3))
    with pytest.raises(ExpertUnavailable):
        asyncio.run(collect(engine_over(stream), request()))
    # After the first chunk the client has output already: a plain failure, not a retry.
    stream = FakeStream(chunks("a b")[:1], fail=BackPressureError(3, 3))
    with pytest.raises(ExpertFailed):
        asyncio.run(collect(engine_over(stream), request()))


def test_closing_early_cancels_the_call() -> None:
    stream = FakeStream(chunks("one two three"))
    engine = engine_over(stream)

    async def first_only() -> None:
        it = engine.generate(request())
        await anext(it)
        await it.aclose()

    asyncio.run(first_only())
    assert stream.cancelled
    done = FakeStream(chunks("one"))
    asyncio.run(collect(engine_over(done), request()))
    assert not done.cancelled


# -- the router app over fake handles --------------------------------------------------------


def router_app(items_for: Any) -> Any:
    def opener(wire: dict) -> FakeStream:
        return FakeStream(items_for(wire))

    infos = {"smollm2": {"max_context": 1024, "n_layers": 30}}
    options = ray_app.AppOptions.parse({"model": "smollm2", "api_key": ""})
    return ray_app.build_router({"smollm2": None}, infos, options, opener=opener)


def test_router_app_over_fake_handles() -> None:
    app = router_app(lambda wire: chunks("Paris is the capital"))

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/ready")).json()["healthy_experts"] == ["smollm2"]
            models = (await c.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["smollm2"]
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "Capital?"}]}
            r = await c.post("/v1/chat/completions", json={**body, "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "Paris is the capital"
            assert r.headers["x-tandem-replica"] == "serve://smollm2/abc123"
            r = await c.post("/v1/chat/completions", json={**body, "max_tokens": -1})
            assert r.status_code == 400

    asyncio.run(go())


def test_router_app_answers_400_for_the_experts_refusal() -> None:
    app = router_app(lambda wire: [{"error": {"kind": "invalid", "message": "chat template"}}])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"model": "smollm2", "prompt": "x", "max_tokens": 4}
            return await c.post("/v1/completions", json=body)

    r = asyncio.run(go())
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


# -- the application's Serve options ---------------------------------------------------------


def _deployments(app: Any) -> dict[str, Any]:
    """name -> Deployment of a built application (the ingress and the experts it binds)."""
    router = app._bound_deployment
    experts = router.init_args[0]
    return {router.name: router} | {
        a._bound_deployment.name: a._bound_deployment for a in experts.values()
    }


def test_build_app_uses_fractional_cpus_and_autoscaling() -> None:
    app = ray_app.build_app({"model": "smollm2,gemma3", "expert_num_cpus": "0.5"})
    deps = _deployments(app)
    assert set(deps) == {"router", "expert-smollm2", "expert-gemma3"}
    for name, d in deps.items():
        cpus = d.ray_actor_options["num_cpus"]
        assert 0 < cpus < 1, name
        auto = d._deployment_config.autoscaling_config
        assert auto.min_replicas == 1 and auto.max_replicas >= 2, name
        assert auto.target_ongoing_requests > 0
    assert deps["expert-smollm2"].ray_actor_options["num_cpus"] == 0.5
    assert deps["router"].ray_actor_options["num_cpus"] == 0.25


def test_build_app_rejects_unknown_arguments() -> None:
    with pytest.raises(ValueError, match="unknown build_app argument"):
        ray_app.build_app({"modle": "smollm2"})
    with pytest.raises(ValueError, match="max_batch"):
        ray_app.build_app({"max_batch": "many"})


def test_serve_config_file_is_valid() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "deploy.ray.app:build_app"
    options = ray_app.AppOptions.parse(application.args)
    assert options.models == ("smollm2",)
    ray_app.build_app(application.args)


# -- the real thing: a local Ray ------------------------------------------------------------


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    names = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard")
    return [line for line in out.splitlines()[1:] if any(n in line for n in names)]


@pytest.fixture(scope="module")
def ray_serve_base() -> Iterator[str]:
    """The application on a local Ray (2 CPUs, 100 MB object store, no dashboard); always
    shut down, and no Ray process is left behind."""
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already initialised in this process")
    before = set(_ray_processes())
    port = free_port()
    start = time.monotonic()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.build_app({"model": "smollm2"}), name="tandem", route_prefix="/")
        print(f"ray serve up in {time.monotonic() - start:.1f}s")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    deadline = time.monotonic() + 30
    while set(_ray_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    left = set(_ray_processes()) - before
    assert not left, f"Ray processes left behind: {left}"


@pytest.mark.slow
def test_serve_app_on_local_ray(ray_serve_base: str) -> None:
    base = ray_serve_base
    ready = httpx.get(f"{base}/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["healthy_experts"] == ["smollm2"]

    models = httpx.get(f"{base}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["smollm2"]

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    chat = raw.parse()
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    assert chat.usage.model_extra["tandem"]["router"]["answered_by"] == "smollm2"
    assert raw.headers["x-tandem-replica"].startswith("serve://smollm2/")

    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2", prompt="def add(a, b):", temperature=0, max_tokens=12, stream=True
        )
    ]
    assert len(parts) > 1 and "".join(parts).strip()

    bad = httpx.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": -1,
        },
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "max_tokens"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
