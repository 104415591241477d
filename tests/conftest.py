"""Shared fixtures: a real redis-server per test session, on a free port, in a temp dir.

Tests never touch a Redis they did not start; each test gets its own database number on
the session's server and only that database is flushed.
"""

from __future__ import annotations

import os

# The settings the in-process Celery app is configured from, once per process, when a test first
# reads its configuration: set here, before any test runs.
os.environ.setdefault("GOKIQ_QUEUES", "default critical low")  # test_tasks uses all three
os.environ.setdefault("GOKIQ_WORKER_METRICS_PORT", "0")  # no /metrics server in tests

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DATABASES = 256  # per redis-server: a test takes a pair of its own (redis_db)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    """Poll until `predicate()` is truthy; fail the test with `message` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    dir: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)


def start_redis(workdir: Path, port: int | None = None, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--databases",
        str(DATABASES),
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, proc, workdir)
    wait_for(lambda: _pings(server), timeout=10, message="redis-server did not start")
    return server


def _pings(server: RedisServer) -> bool:
    try:
        return bool(server.client().ping())
    except redis.ConnectionError:
        return False


def sidekiq_processes(redis_url: str, signal: str = "") -> dict:
    """Sidekiq's own view of its process registry (tests/sidekiq_processes.rb, the installed
    Sidekiq's Ruby API), after sending `signal` ("quiet", "stop") to every process."""
    done = subprocess.run(
        ["ruby", str(Path(__file__).with_name("sidekiq_processes.rb")), *filter(None, [signal])],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


# Odd dbs for Sidekiq data, the even one above for Celery; 60-63 belong to the module-wide
# workers of test_tasks and test_heartbeat.
_next_db = (db for db in range(1, DATABASES, 2) if not 59 <= db <= 63)


@pytest.fixture
def redis_db(redis_server) -> int:
    """A database number on the session's server, empty, for this test only."""
    try:
        db = next(_next_db)
    except StopIteration:
        pytest.fail("out of test databases: raise DATABASES in tests/conftest.py")
    for n in (db, db + 1):
        redis_server.client(n).flushdb()
    return db


@pytest.fixture
def redis_url(redis_server, redis_db) -> str:
    """Sidekiq's Redis for one test; its Celery broker is `broker_url` (the next db)."""
    return redis_server.url(redis_db)


@pytest.fixture
def broker_url(redis_server, redis_db) -> str:
    return redis_server.url(redis_db + 1)


@pytest.fixture
def redis_client(redis_server, redis_db) -> redis.Redis:
    return redis_server.client(redis_db)
