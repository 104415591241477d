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
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from gokiq_celery import kombu_unacked
from gokiq_celery.sidekiq.redis_client import lua_source

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
        # Tags of messages popped (and recorded) with an earlier one, not yet delivered.
        self._prerecorded: set[str] = set()

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
        if delivery_tag in self._prerecorded:  # popped with an earlier one, its record written
            self._prerecorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        # kombu's append (its zadd and hset), with the pending acks in the same transaction;
        # during a BRPOP reply, with the pops of more messages when the prefetch leaves room.
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        acks = self._take_pending_acks()
        room = self.channel.room_to_pop(self)
        try:
            if room:
                self.channel.record_and_pop(delivery_tag, record, acks, room)
            else:
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
    """kombu's Redis channel, whose BRPOP reply may bring several messages.

    kombu's consumer takes one message per BRPOP, then writes its unacked record: two round
    trips per message on the worker's event loop. Here, when a BRPOP delivers a message and
    the prefetch count leaves room for more, the write of its record also pops up to
    `pop_batch` - 1 more messages from the same lists in BRPOP's key order (priorities, then
    the queue cycle; a batch may come from one queue where kombu would alternate) and records
    each in kombu's `unacked` as kombu would, in one Lua call (lua/pop_deliveries.lua). They
    are delivered right after the first, each a message of its own, so never more are in
    flight than the prefetch count allows (a consumer without one, unlimited for kombu, takes
    one per BRPOP as kombu does). No message leaves its list
    without its record: a worker killed after the call has them restored as any unacked one.

    Upstream kombu has no such fetch for Redis (its SQS transport receives up to
    `can_consume_max_estimate()` messages per call; Redis itself has no BRPOP with a count,
    redis/redis#936). A `global_keyprefix` turns it off (kombu prefixes only some EVALSHA keys),
    as does the transport option `pop_batch: 1`.
    """

    QoS = AckBatchingQoS
    pop_batch = 8  # at most this many messages a BRPOP reply brings (1: kombu's one)
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "pop_batch")
    _command_client: tuple[Any, Any] | None = None  # (the pool it wraps, the client)
    _last_connparams: dict[bool, dict[str, Any]] | None = None  # by `asynchronous`
    _popping: list[tuple[bytes, str, bytes]] | None = None  # (list, tag, payload): BRPOP's turn
    _pop_script: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects (or raises)
        kombu_unacked.settle_unsettled(self)

    def _brpop_read(self, **options: Any) -> Any:
        self._popping = []  # the delivered message's record may pop more (AckBatchingQoS)
        try:
            return super()._brpop_read(**options)
        finally:
            popped, self._popping = self._popping, None
            if popped:
                self._deliver_popped(popped)

    def room_to_pop(self, qos: AckBatchingQoS) -> int:
        """How many more messages the record of the one BRPOP delivers may pop (0: none)."""
        if self._popping is None or self.pop_batch <= 1 or self.global_keyprefix:
            return 0
        room = qos.can_consume_max_estimate()  # None: no prefetch limit, kombu's one at a time
        return 0 if room is None else max(min(room, self.pop_batch) - 1, 0)  # BRPOP's takes one

    def record_and_pop(self, delivery_tag: str, record: str, acks: list[str], room: int) -> None:
        """Write `delivery_tag`'s record, remove the `acks`' ones, and pop up to `room` more
        messages, each recorded (lua/pop_deliveries.lua), for `_brpop_read` to deliver."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        keys = [self.unacked_index_key, self.unacked_key, *lists]
        delivered_at = repr(time.time())
        args = [delivered_at, room, delivery_tag, record, *acks]
        try:
            with self.conn_or_acquire() as client:  # the command client, never BRPOP's
                if self._pop_script is None:
                    self._pop_script = client.register_script(lua_source("pop_deliveries"))
                reply = self._pop_script(keys=keys, args=args, client=client)
        except self.connection_errors:
            self.qos._remember_cut_pop(delivered_at)  # it may have popped some: kombu_unacked
            raise
        if reply:
            triples = zip(reply[::3], reply[1::3], reply[2::3], strict=True)
            self._popping.extend((key, bytes_to_str(tag), payload) for key, tag, payload in triples)

    def _deliver_popped(self, popped: list[tuple[bytes, str, bytes]]) -> None:
        """Deliver the messages popped with BRPOP's, in their order; whatever raises, the ones
        not delivered go back (`_give_back`)."""
        qos = self.qos
        for i, (key, tag, payload) in enumerate(popped):
            try:
                message = loads(bytes_to_str(payload))
                qos._prerecorded.add(tag)
                queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(queue)
                self.connection._deliver(message, queue)
            except BaseException:
                self._give_back(popped[i:])
                raise
            # Its append took the tag out; a delivery that never reached it (no consumer's
            # callback took the message) must not leave it, or a later BRPOP of the same
            # message (restored, same tag) would skip writing its record.
            qos._prerecorded.discard(tag)

    def _give_back(self, popped: list[tuple[bytes, str, bytes]]) -> None:
        """Messages popped with another that could not all be delivered: back to their
        queues now (or, the broker down, by the process's next channel: kombu_unacked)."""
        qos, tags = self.qos, []
        for _, tag, _payload in popped:  # the tag as the script read it: no parse to fail
            qos._prerecorded.discard(tag)
            if tag not in qos._delivered:  # a delivered one is its job's to ack
                tags.append(tag)
        try:
            with self.conn_or_acquire() as client:
                for tag in tags:
                    qos.restore_by_tag(tag, client=client)
        except self.connection_errors:
            qos._remember(tags, kombu_unacked.Unsettled(time.time()))

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
