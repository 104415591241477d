"""The connection to Sidekiq's Redis: one client factory, Lua scripts, and score format.

Every process (bridge, worker, Flower, `gokiq_celery.client`) connects through `connect`, so a
stalled Redis raises (and is retried) instead of hanging a thread, and a restarted one is
reconnected to; gokiq-api through `connect_fail_fast`, which answers its caller instead.
"""

from __future__ import annotations

from pathlib import Path

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff, NoBackoff
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


def _reconnect_once() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def connect(url: str, *, reconnect: bool = True) -> redis.Redis:
    """A client of the Redis at `url`, with gokiq's timeouts and reconnection (`reconnect`
    False: a command caught by a lost connection is sent once more on a new one, at once, then
    fails: for a caller that tries again later and must not stall meanwhile)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=reconnecting() if reconnect else _reconnect_once(),
    )


# gokiq-api's client: a caller is waiting, so Redis gets a short while, and a write is never
# sent twice by the driver (a write whose reply was lost may have been done: the caller is
# told "maybe" and retries with its Idempotency-Key).
FAIL_FAST_TIMEOUT = 2.0
FAIL_FAST_CONNECT_TIMEOUT = 1.0


def connect_fail_fast(url: str) -> redis.Redis:
    """A client of the Redis at `url` that fails at once instead of reconnecting (gokiq-api)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=FAIL_FAST_TIMEOUT,
        socket_connect_timeout=FAIL_FAST_CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        max_connections=64,
    )


def connect_fail_fast_async(url: str) -> redis.asyncio.Redis:
    """`connect_fail_fast` for asyncio (gokiq-api's submissions, on its event loop). A caller
    waits up to FAIL_FAST_TIMEOUT for one of its 64 connections, then fails, as for Redis
    itself."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=FAIL_FAST_TIMEOUT,
        socket_timeout=FAIL_FAST_TIMEOUT,
        socket_connect_timeout=FAIL_FAST_CONNECT_TIMEOUT,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    return redis.asyncio.Redis(connection_pool=pool)


def lua_source(name: str) -> str:
    """The script `lua/<name>.lua`."""
    return (LUA_DIR / f"{name}.lua").read_text()


class Scripts:
    """The Lua scripts of `lua/`, each registered once per client (EVALSHA, reloaded on
    NOSCRIPT). Each module of the package runs its own scripts through this."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._loaded: dict[str, redis.commands.core.Script] = {}

    def __call__(self, name: str) -> redis.commands.core.Script:
        """The script `lua/<name>.lua`."""
        if name not in self._loaded:
            self._loaded[name] = self.redis.register_script(lua_source(name))
        return self._loaded[name]


def score(epoch: float) -> str:
    """A sorted-set score as Sidekiq writes it: float seconds; repr keeps full precision."""
    return repr(float(epoch))
