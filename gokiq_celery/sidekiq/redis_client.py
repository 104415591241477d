"""The connection to Sidekiq's Redis: one client factory, Lua scripts, and score format.

Every process (bridge, worker, Flower, `gokiq_celery.client`) connects through `connect`, so a
stalled Redis raises (and is retried) instead of hanging a thread, and a restarted one is
reconnected to.
"""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

# Timeouts so that a stalled Redis raises (and is retried) instead of hanging a thread.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0
HEALTH_CHECK_INTERVAL = 30
# A Redis that restarts closes every connection, and refuses new ones until it has loaded
# its data. A command caught in that (even one Redis ran, but whose reply was lost: a claim
# of a delivery) is sent again on a new connection for ~15 s, not failed: a job whose claim
# "failed" after Redis had written it would otherwise wait for its deadline (run_window).
RECONNECT_RETRIES = 20

LUA_DIR = Path(__file__).with_name("lua")


def reconnecting() -> Retry:
    backoff = EqualJitterBackoff(cap=1.0, base=0.1)
    return Retry(backoff, RECONNECT_RETRIES, supported_errors=(redis.ConnectionError,))


def connect(url: str) -> redis.Redis:
    """A client of the Redis at `url`, with gokiq's timeouts and reconnection."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=reconnecting(),
    )


class Scripts:
    """The Lua scripts of `lua/`, each registered once per client (EVALSHA, reloaded on
    NOSCRIPT). Each module of the package runs its own scripts through this."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._loaded: dict[str, redis.commands.core.Script] = {}

    def __call__(self, name: str) -> redis.commands.core.Script:
        """The script `lua/<name>.lua`."""
        if name not in self._loaded:
            source = (LUA_DIR / f"{name}.lua").read_text()
            self._loaded[name] = self.redis.register_script(source)
        return self._loaded[name]


def score(epoch: float) -> str:
    """A sorted-set score as Sidekiq writes it: float seconds; repr keeps full precision."""
    return repr(float(epoch))
