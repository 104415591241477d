"""Per-client rate limits of gokiq-api: a token bucket in Redis, one atomic Lua script
(`lua/rate_limit.lua`), so every API process shares each client's bucket. The bucket refills
at `rate` tokens per second up to `burst`; a submission of n jobs takes n tokens."""

from __future__ import annotations

from pathlib import Path

import redis

_SCRIPT = (Path(__file__).with_name("lua") / "rate_limit.lua").read_text


def bucket_key(client: str) -> str:
    return f"gokiq:ratelimit:{client}"


class RateLimiter:
    def __init__(self, client: redis.Redis) -> None:
        self._take = client.register_script(_SCRIPT())

    def take(self, client: str, rate: float, burst: int, cost: int) -> float:
        """Take `cost` tokens from `client`'s bucket: 0.0 when taken, else the seconds to wait
        before they are there (`inf` when `cost` is above `burst`: never)."""
        taken, wait = self._take(keys=[bucket_key(client)], args=[repr(rate), burst, cost])
        if taken:
            return 0.0
        wait = float(wait)
        return float("inf") if wait < 0 else wait
