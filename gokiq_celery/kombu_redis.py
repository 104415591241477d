"""kombu's Redis transport, with one command client per connection pool instead of one per call.

kombu 5.7's Redis channel builds a new `redis.Redis` around its connection pool for every
command it sends outside the consumer's BRPOP: each ack (`QoS.ack`), each unacked-index write
and each event published to the fanout exchange. With redis-py 8 that constructor is heavy
(option parsing, a case-insensitive callbacks dict, maintenance-notification set-up): on the
worker's one GIL it cost about as much as the Redis round trip it wraps. A `redis.Redis` is
safe to share between threads (each command borrows a connection from the pool), so this
channel keeps the one it made until kombu replaces the pool (after a fork or a reconnect).
Everything else is kombu's. celeryconfig.py selects it for `redis://` broker URLs.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: tuple[Any, Any] | None = None  # (the pool it wraps, the client)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's own BRPOP client: kombu caches that one already
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._command_client is None or self._command_client[0] is not pool:
            self._command_client = (pool, super()._create_client())
        return self._command_client[1]


class Transport(kombu_redis.Transport):
    Channel = Channel
