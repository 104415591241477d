"""Sidekiq's stats: the `stat:processed` / `stat:failed` counters (all-time and per UTC day),
and the sizes the Web UI's dashboard shows. Runs are counted here and nowhere else."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis

from .keys import DEAD, RETRY, SCHEDULE, STAT_FAILED, STAT_PROCESSED, stat_day_key

STAT_DAILY_TTL = 157_680_000  # five years, as Sidekiq sets it


def count_runs(pipe: redis.client.Pipeline, processed: int, failed: int, now=None) -> None:
    """Add to Sidekiq's all-time and per-UTC-day counters, as its heartbeat flush does, on
    `pipe` (the transaction that settles the runs' deliveries)."""
    day = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%d")
    for total, count in ((STAT_PROCESSED, processed), (STAT_FAILED, failed)):
        if count:
            pipe.incrby(total, count)
            pipe.incrby(stat_day_key(total, day), count)
            pipe.expire(stat_day_key(total, day), STAT_DAILY_TTL)


class Stats:
    """What `Sidekiq::Stats` reads."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def counts(self) -> dict[str, int]:
        processed, failed = self.redis.mget(STAT_PROCESSED, STAT_FAILED)
        return {"processed": int(processed or 0), "failed": int(failed or 0)}

    def set_sizes(self) -> dict[str, int]:
        """ZCARD of `schedule`, `retry` and `dead`, as `Sidekiq::Stats` shows them."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name in (SCHEDULE, RETRY, DEAD):
                pipe.zcard(name)
            return dict(zip((SCHEDULE, RETRY, DEAD), pipe.execute(), strict=True))
