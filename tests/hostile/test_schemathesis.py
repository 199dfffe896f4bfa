"""Schemathesis against the router's own OpenAPI document (/openapi.json), served by uvicorn
over FakeEngines: every operation, generated valid and invalid requests (coverage phase:
boundary values, wrong types, missing fields; fuzzing phase: random bodies and headers),
with a bounded number of examples. Checks: no 5xx, ever; every answer's status code, content
type and body are documented; schema-invalid requests are rejected with a 4xx; no answer
takes longer than the request timeout (a hang fails).

It runs schemathesis's CLI (`schemathesis run`, the documented interface; its pytest plugin's
lazy fixture loader does not work with pytest 9) in a subprocess against the live server.

The router documents its generation bodies (its handlers read the raw body, so FastAPI cannot
see them): `services.router.app._openapi_docs`. `test_catches_a_server_error` shows the run
can fail: the same command against a router whose /v1/models raises finds the 500."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.live_server import live_server
from tests.hostile.router_under_test import live_router, make_router

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
MAX_EXAMPLES = 50  # per operation and generation mode
REQUEST_TIMEOUT_S = 10  # a hang is a failure too
RUN_TIMEOUT_S = 240


def schemathesis(base: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--max-response-time",
        str(REQUEST_TIMEOUT_S),
        "--workers",
        "1",
        "--seed",
        "7",
        "--generation-database",
        "none",
        "--no-color",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )


def test_router_api_has_no_server_errors(tmp_path: Path) -> None:
    with live_router() as (base, _):
        run = schemathesis(base, tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    assert "6 selected / 6 total" in out, out[-5000:]  # every operation was tested
    assert " failed" not in out.split("SUMMARY")[-1], out[-5000:]


def test_openapi_describes_the_generation_bodies() -> None:
    doc = make_router().app.openapi()
    for path, name in (
        ("/v1/completions", "RouterCompletionRequest"),
        ("/v1/chat/completions", "RouterChatCompletionRequest"),
    ):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        body = doc["components"]["schemas"][name]
        assert set(body["properties"]["model"]["enum"]) == {"prose_pro", "code_pro", "meh", "auto"}
        assert {"latency_ms", "energy_j", "best_effort", "top_k"} <= set(body["properties"])
        assert {"200", "400", "404", "413", "429"} <= set(op["responses"])
        headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
        assert "x-tandem-top-k" in headers
    chat = doc["components"]["schemas"]["RouterChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 256  # LIMITS
    assert chat["properties"]["stop"]["anyOf"][1]["maxItems"] == 4


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
def test_catches_a_server_error(tmp_path: Path, path: str) -> None:
    """The same run finds a 500 where there is one (here: a middleware that raises)."""
    rut = make_router()

    @rut.app.middleware("http")
    async def broken(request, call_next):  # noqa: ANN001, ANN202
        if request.url.path == path:
            raise RuntimeError("deliberate")
        return await call_next(request)

    with live_server(rut.app) as base:
        run = schemathesis(base, tmp_path, "--max-examples", "5", "--include-path", path)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-5000:]
    assert "Server error" in out, out[-5000:]
