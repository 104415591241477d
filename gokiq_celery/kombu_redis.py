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

Acks (`AckBatchingQoS`) ride with the next message's unacked record instead of taking a round
trip each: see that class.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps


class AckBatchingQoS(kombu_redis.QoS):
    """kombu's Redis QoS, whose acks on the event loop's thread share a round trip.

    The worker's event loop (one thread) reads each message, writes its unacked record (a
    blocking round trip) and, with the threads pool, also runs each finished task's ack (a
    blocking round trip of its own). Every blocking round trip hands the GIL to the job
    threads and waits to get it back: the loop, not the jobs, bounded a busy worker. Here an
    ack frees its prefetch slot at once (in memory, as before) and its Redis part (removing
    the unacked record) is written in the same transaction as the next message's unacked
    record, or on its own after ACK_DELAY when no message comes first.

    What waits is only the removal of records of messages that are done: should the process die
    before it is written, those messages are restored like any unacked one, and the delivery
    ledger skips them as stale (their jobs were settled) or runs them again (at-least-once, as
    for a job that was still running). Closing the channel writes the pending acks.
    An ack from any other thread is written at once, as kombu does.
    """

    ACK_DELAY = 0.01  # seconds a lone ack may wait for a message to ride with

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: deque[str] = deque()
        self._ack_timer = None

    def ack(self, delivery_tag: str) -> None:
        loop = getattr(self.channel.connection, "event_loop", None)
        if loop is None or threading.get_ident() != loop._loop_thread:
            super().ack(delivery_tag)
            return
        self._acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # the prefetch slot is free now
        if self._ack_timer is None:
            self._ack_timer = loop.call_later(self.ACK_DELAY, self._acks_due)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            acks = self._queue_acks(pipe)
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, record)
            self._execute(pipe, acks)
        virtual.QoS.append(self, message, delivery_tag)

    def flush_acks(self) -> None:
        """Write the pending acks now."""
        with self.pipe_or_acquire() as pipe:
            acks = self._queue_acks(pipe)
            if acks:
                self._execute(pipe, acks)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        # On close: acked messages must not stay recorded as unacked (to be restored later).
        self._acks_due()
        return super().restore_unacked_once(stderr)

    def _acks_due(self) -> None:
        self._ack_timer = None
        with contextlib.suppress(redis.RedisError):  # broker away: the next message tries again
            self.flush_acks()

    def _queue_acks(self, pipe: Any) -> list[str]:
        acks = []
        while self._acks:
            acks.append(self._acks.popleft())
        if acks:
            pipe.zrem(self.unacked_index_key, *acks)
            pipe.hdel(self.unacked_key, *acks)
        return acks

    def _execute(self, pipe: Any, acks: list[str]) -> None:
        try:
            pipe.execute()
        except BaseException:
            self._acks.extendleft(reversed(acks))  # not written: they stay pending
            raise


class Channel(kombu_redis.Channel):
    QoS = AckBatchingQoS
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
    event_loop: Any = None  # the worker's kombu Hub, once the consumer runs on one

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)
