"""A bounded load of OpenAI requests that tallies how each one ended (failure drills).

No locust here: this is plain httpx in threads, so tests and `make drills` can run it while
they kill things. Every request ends in exactly one bucket:

- `succeeded`: 200 with a complete answer (a stream that ended with `data: [DONE]` and no
  error event);
- `failed_cleanly`: an OpenAI-shaped error: a 4xx/5xx with a JSON `error` body, or a stream
  that sent an `error` event and then `[DONE]`;
- `lost`: anything else: a connection error, a timeout (a hang), a body that is not JSON, a
  stream cut off without `[DONE]`. A drill passes only with `lost == 0`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts["sent"] += 1
            self.counts[outcome] += 1
            self.by_kind.setdefault(kind, Counter())[outcome] += 1
            if outcome != "succeeded" and outcome not in self.examples:
                self.examples[outcome] = detail[:300]

    def row(self) -> dict[str, int]:
        return {k: self.counts[k] for k in ("sent", "succeeded", "failed_cleanly", "lost")}


def _error_body(text: str) -> bool:
    try:
        return isinstance(json.loads(text).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def one_request(client: httpx.Client, url: str, body: dict, stream: bool) -> tuple[str, str]:
    """(outcome, detail) of one request."""
    try:
        if not stream:
            r = client.post(url, json=body)
            if r.status_code == 200:
                data = r.json()
                ok = data["choices"] and data["usage"]["completion_tokens"] >= 0
                return ("succeeded", "") if ok else ("lost", r.text)
            return (
                "failed_cleanly" if _error_body(r.text) else "lost",
                f"{r.status_code} {r.text}",
            )
        with client.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                text = r.read().decode(errors="replace")
                return (
                    "failed_cleanly" if _error_body(text) else "lost",
                    f"{r.status_code} {text}",
                )
            error, done = None, False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                if _error_body(payload):
                    error = payload
            if not done:
                return "lost", "stream ended without [DONE]"
            return ("failed_cleanly", error) if error else ("succeeded", "")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return "lost", f"{type(exc).__name__}: {exc}"


def run_load(
    base_url: str,
    model: str,
    *,
    seconds: float,
    clients: int = 4,
    max_tokens: int = 16,
    stream_every: int = 2,
    timeout_s: float = 60.0,
    api_key: str | None = None,
) -> Tally:
    """`clients` threads, each sending requests back to back for `seconds` (every
    `stream_every`-th one streamed), then stopping by themselves."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    url = f"{base_url}/v1/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def worker(i: int) -> None:
        n = 0
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            while time.monotonic() < deadline:
                stream = stream_every > 0 and n % stream_every == 1
                body = {
                    "model": model,
                    "prompt": f"Request {i}-{n}: the sky is",
                    "max_tokens": max_tokens,
                }
                outcome, detail = one_request(client, url, body, stream)
                tally.add("stream" if stream else "plain", outcome, detail)
                n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 30)
    return tally
