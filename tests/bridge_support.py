"""Shared helpers for the bridge tests: a redis-server of their own, real
`gokiq-bridge` subprocesses, and readers for the Celery messages the bridge published.

The bridge tests use their own server (with 64 dbs) rather than the session one so that they
do not use up the databases the other suites count on.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gokiq_celery.settings import load_settings
from gokiq_celery.sidekiq.keys import QUEUES, queue_key
from gokiq_celery.sidekiq.store import SidekiqStore

from .conftest import REPO, start_redis, wait_for

__all__ = ["BridgeProcess", "Env", "bridge_env", "bridge_redis", "make_job", "wait_for"]


@pytest.fixture(scope="module")
def bridge_redis(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("bridge-redis"))
    server.dbs = itertools.count(0, 2)
    yield server
    server.process.kill()
    server.process.wait(10)


@dataclass
class Env:
    """One test's Sidekiq Redis (db n) and Celery broker (db n+1) on the bridge tests' server."""

    server: object
    db: int
    tmp: Path

    @property
    def redis_url(self) -> str:
        return self.server.url(self.db)

    @property
    def broker_url(self) -> str:
        return self.server.url(self.db + 1)

    @property
    def redis(self) -> redis.Redis:
        return self.server.client(self.db)

    @property
    def broker(self) -> redis.Redis:
        return self.server.client(self.db + 1)

    def store(self) -> SidekiqStore:
        return SidekiqStore(self.redis)

    def settings(self, **overrides):
        overrides.setdefault("redis_url", self.redis_url)
        overrides.setdefault("celery_broker_url", self.broker_url)
        overrides.setdefault("bridge_metrics_port", 0)
        return load_settings(None, {}, **overrides)

    def push(self, queue: str, payloads: list[str | bytes]) -> None:
        for i in range(0, len(payloads), 1000):
            self.redis.lpush(queue_key(queue), *payloads[i : i + 1000])
        self.redis.sadd(QUEUES, queue)

    def messages(self, celery_queue: str) -> list[dict]:
        """The Celery messages waiting in `celery_queue` on the broker, oldest first, decoded:
        {"headers": ..., "args": [payload_text, queue], "raw": the kombu envelope}."""
        out = []
        for raw in reversed(self.broker.lrange(celery_queue, 0, -1)):
            envelope = json.loads(raw)
            args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            out.append({"headers": envelope["headers"], "args": args, "kwargs": kwargs})
        return out

    def published_jids(self, celery_queue: str) -> list[str]:
        return [m["headers"]["id"] for m in self.messages(celery_queue)]

    def broker_count(self, *celery_queues: str) -> int:
        return sum(self.broker.llen(q) for q in celery_queues)

    def held_by_bridges(self) -> int:
        """Jobs sitting in any bridge's in-flight or moving lists."""
        return sum(self.store().queues.held_by_bridges().values())


@pytest.fixture
def bridge_env(bridge_redis, tmp_path) -> Env:
    db = next(bridge_redis.dbs)
    if db >= 63:
        pytest.fail("bridge tests ran out of databases")
    for n in (db, db + 1):
        bridge_redis.client(n).flushdb()
    return Env(bridge_redis, db, tmp_path)


def make_job(n: int, queue: str = "default", **extra) -> str:
    """A realistic Sidekiq 7 payload (as Sidekiq 6.4.1 wrote it, docs/sidekiq-protocol.md §1.3)."""
    fields = {
        "retry": True,
        "queue": queue,
        "args": [n, "two", {"three": 3}],
        "class": "HardJob",
        "jid": f"{n:024x}",
        "created_at": 1795415903.1272464,
        "enqueued_at": 1795415903.1275609,
    }
    fields.update(extra)
    return json.dumps(fields, separators=(",", ":"))


def _clean_environ() -> dict[str, str]:
    # Other test modules set GOKIQ_* for their in-process apps; a bridge must not inherit them.
    drop = ("GOKIQ_", "REDIS_URL", "CELERY_BROKER_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class BridgeProcess:
    """`python -m bridge.cli` (what the `gokiq-bridge` script runs) as a real subprocess."""

    def __init__(self, env: Env, *args: str, name: str = "bridge", **environ: str) -> None:
        self.log_path = env.tmp / f"{name}-{time.monotonic_ns()}.log"
        full_env = _clean_environ()
        full_env.update(
            REDIS_URL=env.redis_url,
            CELERY_BROKER_URL=env.broker_url,
            GOKIQ_BRIDGE_METRICS_PORT="0",
            # No sidecar here publishes the app's version; configured as an operator may.
            GOKIQ_SIDEKIQ_VERSION="7",
            PYTHONPATH=str(REPO),
        )
        full_env.update(environ)
        self.log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=self.log_file,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.log_file.close()

    def terminate(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.log_file.close()
        return code

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()
