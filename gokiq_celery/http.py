"""`/metrics`, `/health` and `/ready` on a small threaded HTTP server, for the bridge and the
worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class StatusServer:
    """Serves a process's status in a daemon thread.

    `/health`: the process is alive (200 "ok"). `/ready` (only with a `ready` check): `ready()`
    returned True, e.g. the bridge's Redis and broker are reachable (200), else 503.
    `/metrics`: Prometheus text format. Any other path: 404.
    """

    def __init__(
        self,
        bind: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool] | None = None,
        name: str = "status-http",
    ) -> None:
        handler = _handler(registry, ready)
        self.server = ThreadingHTTPServer((bind, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(registry: CollectorRegistry, ready: Callable[[], bool] | None):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                self._reply(200, b"ok\n")
            elif path == "/ready" and ready is not None:
                ok = _safely(ready)
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # probes every few seconds: quiet
            log.debug("http: " + format, *args)

    return Handler


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
