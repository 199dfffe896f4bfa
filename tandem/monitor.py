"""A small HTTP server beside the gRPC one: GET /metrics (Prometheus text from an explicit
registry) and GET /health (JSON; 503 when `health()` says not ready, e.g. Redis is down).
Runs on its own daemon thread (stdlib `ThreadingHTTPServer`), so it keeps answering while
the model thread is busy.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)
Health = Callable[[], tuple[bool, dict[str, Any]]]  # (ready, details)


@dataclass
class RunningMonitor:
    server: ThreadingHTTPServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_monitor(
    registry: CollectorRegistry, health: Health, host: str = "127.0.0.1", port: int = 0
) -> RunningMonitor:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/health":
                try:
                    ready, details = health()
                except Exception as exc:  # a probe must get an answer
                    ready, details = False, {"error": repr(exc)}
                body = json.dumps({"status": "ok" if ready else "unavailable", **details})
                self._send(200 if ready else 503, "application/json", body.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            log.debug("monitor: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="monitor", daemon=True)
    thread.start()
    bound = server.server_address[1]
    log.info("monitor (/metrics, /health) on http://%s:%d", host, bound)
    return RunningMonitor(server, thread, bound)
