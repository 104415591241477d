"""Sidekiq's queues, and the bridge's reliable fetch out of them.

A queue is the list `queue:<q>` (LPUSH onto the head, the tail runs next) named in the
`queues` set. The bridge moves jobs atomically from a queue into its in-flight list for that
queue (lua/fetch_jobs.lua, or BLMOVE for one queue), and hands them from there to the delivery
ledger (ledger.py) before it publishes them; a bridge that dies leaves its in-flight lists to
be given back to their queues (bridges.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from .dead import DeadSet
from .keys import QUEUES, SCHEDULED_SETS, inflight_key, moving_key, queue_key
from .redis_client import Scripts


class Queues:
    def __init__(self, client: redis.Redis, scripts: Scripts, dead: DeadSet) -> None:
        self.redis = client
        self.scripts = scripts
        self.dead = dead

    # -- Sidekiq's queues -------------------------------------------------------------------

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

    def names(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(QUEUES))

    def size(self, queue: str) -> int:
        return self.redis.llen(queue_key(queue))

    def jobs(self, queue: str) -> list[bytes]:
        return self.redis.lrange(queue_key(queue), 0, -1)

    def oldest(self, queue: str) -> bytes | None:
        """The job that runs next (the list's tail), for latency as `Sidekiq::Queue#latency`."""
        return self.redis.lindex(queue_key(queue), -1)

    def sizes_and_oldest(self, queues: Sequence[str]) -> dict[str, tuple[int, bytes | None]]:
        """LLEN and the next-to-run job of each queue, in one round trip (for metrics)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue_key(queue))
                pipe.lindex(queue_key(queue), -1)
            replies = pipe.execute()
        return {q: (replies[2 * i], replies[2 * i + 1]) for i, q in enumerate(queues)}

    # -- the bridge's reliable fetch ----------------------------------------------------------

    def fetch_jobs(
        self, bridge_id: str, queues: Sequence[str], limit: int
    ) -> tuple[str, list[bytes]] | None:
        """Atomically move up to `limit` jobs from the first non-empty queue (in the given
        order) into the bridge's in-flight list for it. Returns (queue, jobs in run order)."""
        keys = []
        for queue in queues:
            keys += [queue_key(queue), inflight_key(bridge_id, queue)]
        if not keys:
            return None
        result = self.scripts("fetch_jobs")(keys=keys, args=[limit])
        if not result:
            return None
        return queues[int(result[0]) - 1], list(result[1:])

    def wait_job(self, bridge_id: str, queue: str, timeout: float) -> bytes | None:
        """Block up to `timeout` seconds for one job on `queue` and move it into the bridge's
        in-flight list as `fetch_jobs` does (queue's tail to the list's head), in one command
        (BLMOVE, Redis >= 6.2). None when nothing came."""
        return self.redis.blmove(
            queue_key(queue), inflight_key(bridge_id, queue), timeout, "RIGHT", "LEFT"
        )

    def bury_inflight(
        self, bridge_id: str, queue: str, raw: bytes, reason: str = "", entry: bytes = b""
    ) -> None:
        """A fetched payload that is not a job: into the dead set (as `entry`, default the exact
        bytes read), and out of the in-flight list, in one transaction."""
        with self.redis.pipeline(transaction=True) as pipe:
            self.dead.add_in(pipe, entry or raw)
            pipe.lrem(inflight_key(bridge_id, queue), 1, raw)
            pipe.execute()

    def inflight_jobs(self, bridge_id: str, queue: str) -> list[bytes]:
        return self.redis.lrange(inflight_key(bridge_id, queue), 0, -1)

    def inflight_count(self, bridge_id: str, queues: Iterable[str]) -> int:
        """Jobs the bridge holds: in-flight lists plus its moving lists (scheduled.py)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(inflight_key(bridge_id, queue))
            for set_name in SCHEDULED_SETS:
                pipe.llen(moving_key(bridge_id, set_name))
            return sum(pipe.execute())

    def held_by_bridges(self) -> dict[str, int]:
        """Every bridge in-flight or moving list in Redis, with its length (SCAN: for
        operators and tests, not for hot paths)."""
        held = {}
        for pattern in (inflight_key("*", "*"), moving_key("*", "*")):
            for key in self.redis.scan_iter(match=pattern, count=1000):
                held[key.decode()] = self.redis.llen(key)
        return held
