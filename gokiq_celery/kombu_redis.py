"""kombu's Redis transport, with one command client per connection pool instead of one per call.

kombu 5.7's Redis channel builds a new `redis.Redis` around its connection pool for every
command it sends outside the consumer's BRPOP: each ack (`QoS.ack`), each unacked-index write
and each event published to the fanout exchange. With redis-py 8 that constructor is heavy
(option parsing, a case-insensitive callbacks dict, maintenance-notification set-up): on the
worker's one GIL it cost about as much as the Redis round trip it wraps. A `redis.Redis` is
safe to share between threads (each command borrows a connection from the pool), so this
channel keeps the one it made until kombu replaces the pool (after a fork or a reconnect).
Everything else is kombu's. celeryconfig.py selects it for `redis://` broker URLs.

It also keeps a worker alive through a broker restart. On a connection loss Celery 5.7's
consumer first `collect()`s the connection (which unhooks the transport from it) and then
`close()`s it; closing the channel restores its unacknowledged messages through a new pool,
whose parameters kombu reads from that unhooked connection: an AttributeError that Celery calls
unrecoverable, and the worker process exits. Here the parameters read while connected are
reused, so the messages go back to their queue (or, with the broker still down, the failure is
a connection error that Celery ignores and the consumer reconnects).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: tuple[Any, Any] | None = None  # (the pool it wraps, the client)
    _last_connparams: dict[bool, dict[str, Any]] | None = None  # by `asynchronous`

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self._last_connparams is None:
            self._last_connparams = {}
        if self.connection.client is None:  # collected: see the module's docstring
            if asynchronous not in self._last_connparams:
                raise redis.ConnectionError("the broker connection was closed")
            return dict(self._last_connparams[asynchronous])
        params = super()._connparams(asynchronous=asynchronous)
        self._last_connparams[asynchronous] = dict(params)
        return params

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's own BRPOP client: kombu caches that one already
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._command_client is None or self._command_client[0] is not pool:
            self._command_client = (pool, super()._create_client())
        return self._command_client[1]


class Transport(kombu_redis.Transport):
    Channel = Channel
