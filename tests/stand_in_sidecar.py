"""A small real HTTP server that speaks the sidecar's contract (rails_sidecar/README.md).

It stands in for the Ruby sidecar where a test is about the Python side: what a job does is
chosen by its class name, and every call is recorded for the test to read back.

  OkJob              200
  FailJob            500, ArgumentError "boom"; args[0] (optional) is the `retry_in` to report
  FlakyJob           args [failures, retry_in]: 500 for the first `failures` runs of a jid
  UnknownJob         422 NameError
  SlowJob            args [seconds]: sleeps, then 200
  CloseJob           200 with `Connection: close`, then closes the connection
  HangUpJob          200, then closes the connection without saying so (an idle timeout)
  BusyJob            409 "duplicate": another run of the jid holds it
  CrashJob           no answer, the connection closed: the sidecar died running the job

`GET /runs` answers {"execute": n}, the number of jobs it was asked to run so far: how a
process that runs the stand-in in another process (bench/) checks what really ran.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "test-token"


class StandInSidecar:
    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.calls: dict[str, list[dict]] = defaultdict(list)
        self.paths: list[str] = []  # every request's path, in order
        self.peers: list[tuple[str, int]] = []  # the client address of every request
        self.runs: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInSidecar:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def executed(self, jid: str) -> list[dict]:
        with self.lock:
            return [c["job"] for c in self.calls["execute"] if c["job"].get("jid") == jid]

    def exhausted_calls(self, jid: str) -> list[dict]:
        with self.lock:
            return [c for c in self.calls["exhausted"] if c["job"].get("jid") == jid]

    def respond(self, path: str, body: dict, queue: str) -> tuple[int, dict]:
        if path == "exhausted":
            with self.lock:
                self.calls["exhausted"].append(body)
            # DiscardingFailJob's hook returns :discard (on a Sidekiq that honours it).
            discard = bool(body.get("run_hook")) and body["job"].get("class") == "DiscardingFailJob"
            return 200, {"status": "ok", "hook_ran": body.get("run_hook"), "discard": discard}
        with self.lock:
            self.calls["execute"].append({"job": body, "queue": queue})
            self.runs[body.get("jid", "")] += 1
            run = self.runs[body.get("jid", "")]
        return _behaviour(body, run)

    def _handler(self):
        sidecar = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"status": "unauthorized"})
                if self.path != "/runs":
                    return self._send(404, {"status": "not_found"})
                with sidecar.lock:
                    executed = len(sidecar.calls["execute"])
                return self._send(200, {"execute": executed})

            def do_POST(self) -> None:
                sidecar.paths.append(self.path)
                sidecar.peers.append(self.client_address)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"status": "unauthorized"})
                queue = self.headers.get("X-Gokiq-Queue", "")
                if body.get("class") == "CrashJob":
                    sidecar.respond("execute", body, queue)  # recorded as run
                    self.close_connection = True
                    return None
                self._send(*sidecar.respond(self.path.rsplit("/jobs/", 1)[-1], body, queue))
                if body.get("class") in ("CloseJob", "HangUpJob"):
                    self.close_connection = True

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if body.get("close"):
                    self.send_header("Connection", "close")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.end_headers()  # a client past its read timeout has gone
                    self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler


def _behaviour(job: dict, run: int) -> tuple[int, dict]:
    cls, args = job.get("class"), job.get("args") or []
    if cls in ("OkJob", "HangUpJob"):
        return 200, {"status": "ok", "execution_time": 0.001}
    if cls == "BusyJob":
        return 409, {"status": "duplicate"}
    if cls == "CloseJob":
        return 200, {"status": "ok", "execution_time": 0.001, "close": True}
    if cls == "SlowJob":
        time.sleep(float(args[0]))
        return 200, {"status": "ok", "execution_time": float(args[0])}
    if cls in ("FailJob", "DiscardingFailJob"):
        return 500, _failed("ArgumentError", "boom", args[0] if args else None)
    if cls == "FlakyJob" and run <= int(args[0]):
        return 500, _failed("RuntimeError", f"flaky {run}", args[1])
    if cls == "FlakyJob":
        return 200, {"status": "ok", "execution_time": 0.001}
    return 422, {
        "status": "invalid_class",
        "error_class": "NameError",
        "error_message": f"uninitialized constant {cls}",
    }


def _failed(error_class: str, message: str, retry_in) -> dict:
    return {
        "status": "failed",
        "execution_time": 0.001,
        "error_class": error_class,
        "error_message": message,
        "backtrace": ["app/jobs/x.rb:1:in `perform'"] * 3,
        "retry_in": retry_in,
        "class_retry": None,
    }


if __name__ == "__main__":  # a stand-in in its own process, for bench/
    import argparse

    parser = argparse.ArgumentParser(description="Serve the stand-in sidecar until killed.")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    with StandInSidecar(port) as sidecar:
        sidecar.thread.join()
