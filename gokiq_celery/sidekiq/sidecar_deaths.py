"""How many times the sidecar died while running a job (a counter per jid, with a TTL): a job
that keeps killing it (exit!, OOM) is failed instead of being put back for ever."""

from __future__ import annotations

import redis

from .keys import sidecar_deaths_key

SIDECAR_DEATHS_TTL = 3600


class SidecarDeaths:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def count(self, jid: str) -> int:
        """The sidecar died while running `jid`: one more death on its count (kept
        SIDECAR_DEATHS_TTL after the last one). Returns the count."""
        key = sidecar_deaths_key(jid)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, SIDECAR_DEATHS_TTL)
            return int(pipe.execute()[0])
