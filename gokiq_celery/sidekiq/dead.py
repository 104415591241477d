"""The dead set: jobs that failed for good, and payloads that are not jobs (Sidekiq's `dead`)."""

from __future__ import annotations

import time

import redis

from .keys import DEAD
from .redis_client import score


class DeadSet:
    """Sidekiq's `DeadSet`, trimmed by age and size as Sidekiq trims it."""

    def __init__(
        self, client: redis.Redis, max_jobs: int = 10_000, timeout_in_seconds: int = 15_552_000
    ) -> None:
        self.redis = client
        self.max_jobs = max_jobs
        self.timeout_in_seconds = timeout_in_seconds

    def add(self, payload: str | bytes, now: float | None = None) -> None:
        """Sidekiq's `DeadSet#kill`: ZADD now, then trim by age and to `max_jobs` - 1."""
        with self.redis.pipeline(transaction=True) as pipe:
            self.add_in(pipe, payload, now)
            pipe.execute()

    def add_in(self, pipe: redis.client.Pipeline, payload: str | bytes, now=None) -> None:
        """`add`, queued on `pipe` (in the caller's transaction)."""
        now = time.time() if now is None else now
        pipe.zadd(DEAD, {payload: score(now)})
        pipe.zremrangebyscore(DEAD, "-inf", f"({now - self.timeout_in_seconds!r}")
        pipe.zremrangebyrank(DEAD, 0, -self.max_jobs)

    def entries(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(DEAD, 0, -1, withscores=True)
