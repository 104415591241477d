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
a connection error that Celery ignores and the consumer reconnects). What that failed restore
left in the broker's `unacked` hash is restored by the process's next channel to connect
(gokiq_celery/kombu_unacked.py).

Acks taken on the worker's event loop share a round trip with the next message's unacked record
(`AckBatchingQoS`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from gokiq_celery import kombu_unacked

log = logging.getLogger(__name__)


class AckBatchingQoS(kombu_unacked.QoS):
    """kombu's Redis QoS, whose acks on the event loop's thread share a round trip.

    Celery's consumer runs every ack on its event loop (`call_soon_ack`), the thread that also
    reads each message and writes its unacked record. kombu makes each of those a blocking round
    trip, and each one hands the GIL to the job threads and waits to get it back: with the
    threads pool, the loop, not the jobs, bounded a busy worker. Here an ack on the loop frees
    its prefetch slot at once (in memory, as kombu does) and its Redis part, removing the
    message's unacked record, is written in the same MULTI/EXEC as the next message's unacked
    record, or on its own ACK_DELAY after the first pending ack when no message comes first
    (an idle worker), or when the channel closes. So an ack waits at most ACK_DELAY plus one
    turn of the event loop. An ack from any other thread is written at once, as kombu does.

    Only the removal of records of messages whose jobs are done waits. Should that write fail
    on a connection error (a broker restart), the tags are remembered as acked, as a failed ack
    of kombu's own is (kombu_unacked): the process's next channel completes the ack and never
    restores them. Should the process die first, those messages are restored after the
    visibility timeout like any unacked one, and the delivery ledger skips them as stale.
    """

    ACK_DELAY = 0.01  # seconds a lone ack may wait for a message to ride with
    RETRY_DELAY = 1.0  # seconds before acks Redis refused to write are tried again

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_acks: list[str] = []
        self._ack_timer: Any = None

    def ack(self, delivery_tag: str) -> None:
        loop = self.channel.connection.event_loop
        # The Hub's own record of its thread (kombu 5.7; absent: every ack as kombu does it).
        loop_thread = getattr(loop, "_loop_thread", None)
        if loop_thread is None or threading.get_ident() != loop_thread:
            super().ack(delivery_tag)
            return
        self._pending_acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # the prefetch slot is free now
        if self._ack_timer is None:
            self._ack_timer = loop.call_later(self.ACK_DELAY, self._acks_due)

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's append (its zadd and hset), with the pending acks in the same transaction.
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        acks = self._take_pending_acks()
        try:
            with self.pipe_or_acquire() as pipe:
                self._remove_acked(pipe, acks)
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
                pipe.execute()
        except self.channel.connection_errors:
            self._remember_acked(acks)
            self._remember_unrecorded(message, delivery_tag)
            raise
        except BaseException:
            self._keep_pending(acks)
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def flush_acks(self) -> None:
        """Write the pending acks now."""
        acks = self._take_pending_acks()
        if not acks:  # nothing to write: not even a client to take (a closed channel)
            return
        try:
            with self.pipe_or_acquire() as pipe:
                self._remove_acked(pipe, acks)
                pipe.execute()
        except self.channel.connection_errors:
            self._remember_acked(acks)  # the next channel completes them
        except BaseException:
            self._keep_pending(acks)
            raise

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        # On close: acked messages must not stay recorded as unacked, to be restored later.
        # Acks Redis refuses to write (e.g. MISCONF) leave their messages to be restored and
        # skipped as stale by the ledger; the restore itself must still be tried.
        try:
            self.flush_acks()
        except Exception as exc:
            log.warning("cannot write %d acks before closing: %r", len(self._pending_acks), exc)
        return super().restore_unacked_once(stderr)

    def _acks_due(self) -> None:
        self._ack_timer = None
        self.flush_acks()

    def _keep_pending(self, acks: list[str]) -> None:
        """Acks Redis did not write, the connection still up (an error reply: MISCONF, OOM):
        they stay pending, and are tried again after RETRY_DELAY if no message comes first."""
        self._pending_acks[:0] = acks
        loop = self.channel.connection.event_loop
        if self._pending_acks and self._ack_timer is None and loop is not None:
            self._ack_timer = loop.call_later(self.RETRY_DELAY, self._acks_due)

    def _take_pending_acks(self) -> list[str]:
        acks, self._pending_acks = self._pending_acks, []
        return acks

    def _remove_acked(self, pipe: Any, acks: list[str]) -> None:
        if acks:
            pipe.zrem(self.unacked_index_key, *acks)
            pipe.hdel(self.unacked_key, *acks)


class Channel(kombu_redis.Channel):
    QoS = AckBatchingQoS
    _command_client: tuple[Any, Any] | None = None  # (the pool it wraps, the client)
    _last_connparams: dict[bool, dict[str, Any]] | None = None  # by `asynchronous`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects (or raises)
        kombu_unacked.settle_unsettled(self)

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
    event_loop: Any = None  # the worker's kombu Hub, once Celery's consumer runs on one

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)
