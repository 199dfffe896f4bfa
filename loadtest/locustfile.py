"""Locust load test of the router's streaming chat API (`make loadtest`, scripts/loadtest.sh).

Runs in its own virtualenv (.venv-locust) and imports nothing from the project: locust and the
standard library only (plus `requests`, which locust ships). Each user sends streaming
`/v1/chat/completions` requests back to back (closed loop, like `vllm bench serve
--max-concurrency`), parses the SSE stream as it arrives and times every content chunk.

Per request it writes one row to LOADTEST_RECORDS (CSV): send time, HTTP status, outcome,
TTFT, E2E, output tokens (from the final usage chunk, `stream_options.include_usage`), and
the inter-chunk gaps; `python -m loadtest.report` turns that file into the vLLM-style metrics.
It also fires locust request events, so locust's own stats and --csv files work: "chat" (the
whole stream, E2E), and "ttft" (time to the first content chunk).

    locust -f loadtest/locustfile.py --headless -u 4 -r 1 --run-time 60s \
        --host http://127.0.0.1:18180

Environment (all optional):
    LOADTEST_RECORDS     per-request CSV to write (default .run/loadtest/requests.csv)
    LOADTEST_MODEL       `model` of each request: an expert id or `auto` (default smollm2)
    LOADTEST_MAX_TOKENS  max_tokens (default 64)
    LOADTEST_PROMPTS     a text file, one prompt per line (default: a built-in set)
    LOADTEST_WAIT_S      pause between a user's requests (default 0)
    LOADTEST_TIMEOUT_S   read timeout of one request; a hang becomes an error (default 120)
    LOADTEST_API_KEY     bearer token, when the router has TANDEM_API_KEY set
    LOADTEST_PHASE       a label written in every row (e.g. "steady", "overload")
    LOADTEST_RETRY_AFTER_MAX_S  after a 429, wait its Retry-After, at most this long, before
                         the user's next request (default 5; 0 = retry at once)
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import threading
import time
from pathlib import Path

import requests
from locust import User, constant, events, task

RECORDS = Path(os.environ.get("LOADTEST_RECORDS", ".run/loadtest/requests.csv"))
MODEL = os.environ.get("LOADTEST_MODEL", "smollm2")
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "64"))
WAIT_S = float(os.environ.get("LOADTEST_WAIT_S", "0"))
TIMEOUT_S = float(os.environ.get("LOADTEST_TIMEOUT_S", "120"))
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
PHASE = os.environ.get("LOADTEST_PHASE", "")
RETRY_AFTER_MAX_S = float(os.environ.get("LOADTEST_RETRY_AFTER_MAX_S", "5"))

BUILTIN_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it known for?",
    "Give a one-paragraph summary of how a bicycle works.",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of drinking water?",
    "Tell me a fun fact about octopuses.",
]

FIELDS = [
    "start_unix",
    "phase",
    "user",
    "model",
    "status",
    "ok",
    "error",
    "ttft_s",
    "e2e_s",
    "output_tokens",
    "prompt_tokens",
    "content_chunks",
    "itl_ms",
]


def _prompts() -> list[str]:
    path = os.environ.get("LOADTEST_PROMPTS")
    if not path:
        return BUILTIN_PROMPTS
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    return [ln for ln in lines if ln] or BUILTIN_PROMPTS


PROMPTS = _prompts()


def _seconds(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:
        return 0.0  # an HTTP date: not worth parsing here


class Records:
    """The per-request CSV, shared by every user of this process (greenlets, one at a time)."""

    def __init__(self) -> None:
        self.file = None
        self.writer = None
        self.lock = threading.Lock()

    def open(self) -> None:
        RECORDS.parent.mkdir(parents=True, exist_ok=True)
        self.file = RECORDS.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
        self.writer.writeheader()

    def write(self, row: dict) -> None:
        with self.lock:
            if self.writer is not None:
                self.writer.writerow(row)
                self.file.flush()

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
            self.file = self.writer = None


RECORDS_FILE = Records()


@events.test_start.add_listener
def _open(**_kwargs) -> None:
    RECORDS_FILE.open()


@events.quitting.add_listener
def _close(**_kwargs) -> None:
    RECORDS_FILE.close()


class Stream:
    """The outcome of one streamed chat completion."""

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.last_time: float | None = None
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.error = ""
        self.done = False
        self.n_bytes = 0

    def feed(self, line: bytes, now: float) -> None:
        """One SSE line."""
        self.n_bytes += len(line)
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        self.last_time = now  # vLLM: E2E ends at the last data chunk
        try:
            chunk = json.loads(data)
        except ValueError:
            self.error = self.error or "bad_json"
            return
        if isinstance(chunk.get("error"), dict):
            err = chunk["error"]
            self.error = self.error or str(err.get("code") or err.get("type") or "stream_error")
            return
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                self.chunk_times.append(now)
                break
        usage = chunk.get("usage")
        if usage:
            self.output_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")


class ChatUser(User):
    """A client that streams chat completions back to back."""

    wait_time = constant(WAIT_S)
    _ids = itertools.count()

    def on_start(self) -> None:
        self.session = requests.Session()
        self.user_id = next(self._ids)
        self.rng = random.Random(self.user_id)
        if API_KEY:
            self.session.headers["Authorization"] = f"Bearer {API_KEY}"

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, name: str, ms: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="POST",
            name=name,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    @task
    def chat(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        url = f"{self.host.rstrip('/')}/v1/chat/completions"
        start_unix, t0 = time.time(), time.perf_counter()
        s = Stream()
        status = 0
        retry_after = 0.0
        try:
            with self.session.post(url, json=body, stream=True, timeout=(5, TIMEOUT_S)) as r:
                status = r.status_code
                if status == 429:
                    retry_after = _seconds(r.headers.get("Retry-After"))
                if status != 200:
                    try:
                        err = r.json().get("error") or {}
                        s.error = str(err.get("code") or err.get("type") or f"http_{status}")
                    except ValueError:
                        s.error = f"http_{status}"
                    s.last_time = time.perf_counter()
                else:
                    # chunk_size=None: yield bytes as they arrive, not in 512-byte blocks
                    for line in r.iter_lines(chunk_size=None):
                        s.feed(line, time.perf_counter())
                        if s.done:
                            break
                    if not s.done and not s.error:
                        s.error = "truncated"  # the stream ended without [DONE]
        except requests.Timeout:
            s.error = "timeout"
        except requests.RequestException as e:
            s.error = f"connection:{type(e).__name__}"
        end = s.last_time if s.last_time is not None else time.perf_counter()
        ok = not s.error and bool(s.chunk_times)
        if not s.error and not s.chunk_times:
            s.error = "no_content"
        ttft = s.chunk_times[0] - t0 if s.chunk_times else None
        e2e = end - t0
        tokens = s.output_tokens if s.output_tokens is not None else len(s.chunk_times)
        gaps = [b - a for a, b in itertools.pairwise(s.chunk_times)]
        RECORDS_FILE.write(
            {
                "start_unix": f"{start_unix:.6f}",
                "phase": PHASE,
                "user": self.user_id,
                "model": MODEL,
                "status": status,
                "ok": int(ok),
                "error": s.error,
                "ttft_s": "" if ttft is None else f"{ttft:.6f}",
                "e2e_s": f"{e2e:.6f}",
                "output_tokens": tokens,
                "prompt_tokens": "" if s.prompt_tokens is None else s.prompt_tokens,
                "content_chunks": len(s.chunk_times),
                "itl_ms": " ".join(f"{g * 1e3:.3f}" for g in gaps),
            }
        )
        exc = None if ok else RuntimeError(s.error)
        self._fire("chat", e2e * 1e3, s.n_bytes, exc)
        if ttft is not None:
            self._fire("ttft", ttft * 1e3, 0, None)
        if retry_after > 0 and RETRY_AFTER_MAX_S > 0:
            time.sleep(min(retry_after, RETRY_AFTER_MAX_S))  # gevent-patched: this user only
