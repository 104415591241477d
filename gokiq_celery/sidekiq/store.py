"""Sidekiq's Redis data model: every key name and Lua script gokiq uses lives here.

Sidekiq's own keys (reference §2): `queue:<q>` lists and the `queues` set, the `schedule`,
`retry` and `dead` sorted sets, the `stat:*` counters. gokiq's own keys all start with
`gokiq:` so they never collide with Sidekiq's, Pro's (`queue:sq|...`) or Enterprise's.
Nothing outside this module spells a key.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from .job import Job

QUEUES = "queues"
SCHEDULE = "schedule"
RETRY = "retry"
DEAD = "dead"
STAT_PROCESSED = "stat:processed"
STAT_FAILED = "stat:failed"
STAT_DAILY_TTL = 157_680_000  # five years, as Sidekiq sets it

# pybreaker's CircuitRedisStorage prefixes this with "pybreaker:".
BREAKER_NAMESPACE = "gokiq:sidecar"

_LUA_DIR = Path(__file__).with_name("lua")


def queue_key(queue: str) -> str:
    return f"queue:{queue}"


def _score(epoch: float) -> str:
    # Sidekiq writes scores as float seconds; repr keeps full precision.
    return repr(float(epoch))


class SidekiqStore:
    """Reads and writes Sidekiq's data in one Redis, exactly as Sidekiq 6/7/8 would."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        dead_max_jobs: int = 10_000,
        dead_timeout_in_seconds: int = 15_552_000,
    ) -> None:
        self.redis = client
        self.dead_max_jobs = dead_max_jobs
        self.dead_timeout_in_seconds = dead_timeout_in_seconds
        self._scripts: dict[str, redis.commands.core.Script] = {}

    @classmethod
    def from_settings(cls, settings) -> SidekiqStore:  # settings: gokiq_celery.settings.Settings
        return cls(
            redis.Redis.from_url(settings.redis_url),
            dead_max_jobs=settings.dead_max_jobs,
            dead_timeout_in_seconds=settings.dead_timeout_in_seconds,
        )

    def script(self, name: str) -> redis.commands.core.Script:
        """The Lua script `lua/<name>.lua`, registered once (EVALSHA, reloaded on NOSCRIPT)."""
        if name not in self._scripts:
            source = (_LUA_DIR / f"{name}.lua").read_text()
            self._scripts[name] = self.redis.register_script(source)
        return self._scripts[name]

    # -- queues -----------------------------------------------------------------------------

    def push(self, queue: str, *payloads: str | bytes) -> None:
        """Enqueue as Sidekiq's client does: SADD `queues`, LPUSH onto the head (runs last)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(QUEUES, queue)
            pipe.lpush(queue_key(queue), *payloads)
            pipe.execute()

    def requeue(self, queue: str, payload: str | bytes) -> None:
        """Put a job back at the tail (runs next), original bytes, as Sidekiq's shutdown does."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(QUEUES, queue)
            pipe.rpush(queue_key(queue), payload)
            pipe.execute()

    def queue_names(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(QUEUES))

    def queue_size(self, queue: str) -> int:
        return self.redis.llen(queue_key(queue))

    def queue_jobs(self, queue: str) -> list[bytes]:
        return self.redis.lrange(queue_key(queue), 0, -1)

    def oldest_in_queue(self, queue: str) -> bytes | None:
        """The job that runs next (the list's tail), for latency as `Sidekiq::Queue#latency`."""
        return self.redis.lindex(queue_key(queue), -1)

    # -- schedule and retry sets -------------------------------------------------------------

    def schedule_retry(self, job: Job, at: float) -> None:
        """Park a failed job in `retry` until `at`; the bridge's poller re-enqueues it."""
        self.redis.zadd(RETRY, {job.text: _score(at)})

    def schedule(self, job: Job, at: float) -> None:
        """What `perform_at` does: the job waits in `schedule` until `at`."""
        self.redis.zadd(SCHEDULE, {job.text: _score(at)})

    def retry_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(RETRY, 0, -1, withscores=True)

    def scheduled_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(SCHEDULE, 0, -1, withscores=True)

    # -- dead set ----------------------------------------------------------------------------

    def add_dead(self, payload: str | bytes, now: float | None = None) -> None:
        """Sidekiq's `DeadSet#kill`: ZADD now, then trim by age and to `dead_max_jobs` - 1."""
        now = time.time() if now is None else now
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(DEAD, {payload: _score(now)})
            pipe.zremrangebyscore(DEAD, "-inf", f"({now - self.dead_timeout_in_seconds!r}")
            pipe.zremrangebyrank(DEAD, 0, -self.dead_max_jobs)
            pipe.execute()

    def dead_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(DEAD, 0, -1, withscores=True)

    # -- stats -------------------------------------------------------------------------------

    def record_stats(self, processed: int = 0, failed: int = 0, now: float | None = None) -> None:
        """Add to Sidekiq's all-time and per-UTC-day counters, as its heartbeat flush does."""
        day = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%d")
        with self.redis.pipeline(transaction=True) as pipe:
            for total, count in ((STAT_PROCESSED, processed), (STAT_FAILED, failed)):
                if count:
                    pipe.incrby(total, count)
                    pipe.incrby(f"{total}:{day}", count)
                    pipe.expire(f"{total}:{day}", STAT_DAILY_TTL)
            pipe.execute()

    def stats(self) -> dict[str, int]:
        processed, failed = self.redis.mget(STAT_PROCESSED, STAT_FAILED)
        return {"processed": int(processed or 0), "failed": int(failed or 0)}
