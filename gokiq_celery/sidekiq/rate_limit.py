"""Per-client rate limits of gokiq-api: a token bucket in Redis, one atomic Lua script
(`lua/rate_limit.lua`), so every API process shares each client's bucket. The bucket refills
at `rate` tokens per second up to `burst`; a submission of n jobs takes n tokens."""

from __future__ import annotations

import redis

from .keys import rate_limit_key
from .redis_client import Scripts


class RateLimiter:
    def __init__(self, client: redis.Redis) -> None:
        self._take = Scripts(client)("rate_limit")

    def take(self, client: str, rate: float, burst: int, cost: int) -> float:
        """Take `cost` tokens from `client`'s bucket: 0.0 when taken, else the seconds to wait
        before they are there (`inf` when `cost` is above `burst`: never)."""
        taken, wait = self._take(keys=[rate_limit_key(client)], args=[repr(rate), burst, cost])
        if taken:
            return 0.0
        wait = float(wait)
        return float("inf") if wait < 0 else wait
