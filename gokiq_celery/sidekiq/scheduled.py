"""Sidekiq's scheduled sets: `schedule` (perform_at) and `retry` (failed jobs waiting for their
next try), and the bridge's poller's moves out of them.

The poller (bridge/scheduler.py) takes due members into its moving list for the set
(lua/take_due.lua: only one bridge's ZREM can take a member), then pushes them onto their
queues and drops them from the moving list in one MULTI. A bridge that dies in between leaves
its moving lists to be given back to their sets (bridges.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from .dead import DeadSet
from .job import Job
from .keys import QUEUES, RETRY, SCHEDULE, SCHEDULED_SETS, moving_key, queue_key
from .redis_client import Scripts, score

# How long after its due time the bridge's poller leaves a retry to its Celery countdown (which
# claims it from the retry set when it fires, lua/claim_retry.lua): a live worker's timer runs
# it, and a dead worker's retry is still taken within this grace + the poll interval.
RETRY_GRACE = 5.0


class ScheduledSets:
    def __init__(self, client: redis.Redis, scripts: Scripts, dead: DeadSet) -> None:
        self.redis = client
        self.scripts = scripts
        self.dead = dead

    def schedule_retry(self, job: Job, at: float) -> None:
        """Park a failed job in `retry` until `at`; the bridge's poller re-enqueues it."""
        self.redis.zadd(RETRY, {job.text: score(at)})

    def schedule_retry_in(self, pipe: redis.client.Pipeline, job: Job, at: float) -> None:
        """`schedule_retry`, queued on `pipe` (in the caller's transaction)."""
        pipe.zadd(RETRY, {job.text: score(at)})

    def schedule(self, job: Job, at: float) -> None:
        """What `perform_at` does: the job waits in `schedule` until `at`."""
        self.schedule_payloads([(job.text, at)])

    def schedule_payloads(self, scheduled: Sequence[tuple[str, float]]) -> None:
        """`perform_at` for one job or a bulk push: (payload, at) pairs, one ZADD."""
        self.redis.zadd(SCHEDULE, {payload: score(at) for payload, at in scheduled})

    def retry_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(RETRY, 0, -1, withscores=True)

    def scheduled_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(SCHEDULE, 0, -1, withscores=True)

    # -- the bridge's poller ----------------------------------------------------------------

    def take_due(self, set_name: str, bridge_id: str, now: float, limit: int) -> list[bytes]:
        """Atomically take up to `limit` members due at `now` out of `set_name` into the bridge's
        moving list. Safe with many bridges: each member is taken by exactly one."""
        if set_name not in SCHEDULED_SETS:
            raise ValueError(f"not a scheduled set: {set_name!r}")
        keys = [set_name, moving_key(bridge_id, set_name)]
        return list(self.scripts("take_due")(keys=keys, args=[score(now), limit]))

    def enqueue_moved(
        self, set_name: str, bridge_id: str, moves: Sequence[tuple[str, str | bytes, bytes]]
    ) -> None:
        """Push due jobs onto their queues and drop them from the moving list, in one MULTI.

        `moves` holds (queue, payload to push, the bytes taken out of the set)."""
        key = moving_key(bridge_id, set_name)
        with self.redis.pipeline(transaction=True) as pipe:
            for queue in dict.fromkeys(queue for queue, _, _ in moves):
                pipe.sadd(QUEUES, queue)
            for queue, payload, _ in moves:
                pipe.lpush(queue_key(queue), payload)
            for _, _, original in moves:
                pipe.lrem(key, 1, original)
            pipe.execute()

    def bury_moved(self, set_name: str, bridge_id: str, raw: bytes, entry: bytes = b"") -> None:
        """A set member that is not a job: dead set (as `entry`, default its exact bytes), out of
        the moving list."""
        with self.redis.pipeline(transaction=True) as pipe:
            self.dead.add_in(pipe, entry or raw)
            pipe.lrem(moving_key(bridge_id, set_name), 1, raw)
            pipe.execute()
