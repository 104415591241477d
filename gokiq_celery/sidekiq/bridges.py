"""The bridge registry: which gokiq-bridge processes are alive, and giving back what a dead
one held.

A bridge registers its id in `gokiq:bridges` and keeps its heartbeat key alive; the jobs it
holds live in its in-flight lists (queues.py: one per queue, so recovery knows where each job
came from) and its moving lists (scheduled.py: due jobs on their way out of schedule/retry).
Once its heartbeat key has expired, any bridge gives those back (lua/release_bridge.lua).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from .keys import (
    BRIDGES,
    QUEUES,
    SCHEDULED_SETS,
    bridge_key,
    bridge_queues_key,
    inflight_prefix,
    moving_key,
    queue_key,
)
from .redis_client import Scripts, score


class BridgeRegistry:
    def __init__(self, client: redis.Redis, scripts: Scripts) -> None:
        self.redis = client
        self.scripts = scripts

    def register(self, bridge_id: str, queues: Iterable[str], ttl: float) -> None:
        """Announce (or re-announce, as a heartbeat) a live bridge and the queues it fetches.

        Re-adding the id each time means a bridge that was presumed dead after a long stall
        (and whose jobs were recovered) is registered again, so its next jobs are protected.
        """
        queues = list(queues)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(BRIDGES, bridge_id)
            pipe.set(bridge_key(bridge_id), str(time.time()), px=max(int(ttl * 1000), 1))
            if queues:
                pipe.sadd(bridge_queues_key(bridge_id), *queues)
            pipe.execute()

    def ids(self) -> list[str]:
        return sorted(member.decode() for member in self.redis.smembers(BRIDGES))

    def alive(self, bridge_id: str) -> bool:
        return bool(self.redis.exists(bridge_key(bridge_id)))

    def release(self, bridge_id: str, *, only_if_dead: bool = False) -> int:
        """Give back all a bridge holds (in-flight jobs to the tail of their queue, moving jobs to
        their set, due now) and forget the bridge. Returns the number of jobs given back, or -1
        when `only_if_dead` and the bridge's heartbeat still exists."""
        args: list[str] = [
            bridge_id,
            inflight_prefix(bridge_id),
            queue_key(""),
            score(time.time()),
            "1" if only_if_dead else "0",
        ]
        for set_name in SCHEDULED_SETS:
            args += [set_name, moving_key(bridge_id, set_name)]
        keys = [BRIDGES, QUEUES, bridge_key(bridge_id), bridge_queues_key(bridge_id)]
        return int(self.scripts("release_bridge")(keys=keys, args=args))

    def recover_dead(self) -> dict[str, int]:
        """Release every registered bridge whose heartbeat has expired: {bridge id: jobs}."""
        recovered = {}
        for bridge_id in self.ids():
            if self.alive(bridge_id):
                continue
            count = self.release(bridge_id, only_if_dead=True)
            if count >= 0:
                recovered[bridge_id] = count
        return recovered
