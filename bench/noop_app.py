"""gokiq's Celery app plus tasks that make no HTTP call: bench/worker.py and bench/vs_sidekiq.py."""

import os
import time
from functools import cache

import redis

from gokiq_celery import app

app.conf.include = [*app.conf.include]

DONE_KEY = "bench:done"  # bench/vs_sidekiq.py reads the finished tasks from this list


@app.task(name="bench.noop")
def noop(payload: str, queue: str) -> None:
    """Same arguments as gokiq.perform, no sidecar call: the ceiling of the worker itself."""


@cache
def _done_list() -> redis.Redis:
    return redis.Redis.from_url(os.environ["BENCH_DONE_URL"])


@app.task(name="bench.bare")
def bare(ms: float, at: float) -> None:
    """A bare Celery job: sleep `ms`, then record `enqueued-at start end` in one RPUSH (the
    Redis round trip a real job's bookkeeping costs, as the issue's bound INCRs a counter)."""
    start = time.time()
    if ms:
        time.sleep(ms / 1000)
    _done_list().rpush(DONE_KEY, f"{at} {start} {time.time()}")
