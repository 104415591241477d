"""gokiq-api's app served for real by uvicorn, in a thread of the test process, on a free
port: what the API's tests (history and ingestion) talk to over HTTP."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from .conftest import free_port, wait_for


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, message="gokiq-api did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[LiveServer]:
    live = LiveServer(app).start()
    try:
        yield live
    finally:
        live.stop()
