"""Messages a broker outage left in kombu's `unacked` hash, handed back once the broker is back.

kombu's Redis transport records every message it delivers to a worker in the broker's `unacked`
hash. When the worker's channel closes it pushes the ones still unacked back onto their queues
(`QoS.restore_unacked`), so the messages a worker had taken but not run go to whichever worker
reconnects first. Celery's consumer closes its channel when it loses the broker, so in a Redis
restart that restore runs while Redis is down. It fails, and kombu never tries again. The
messages then wait in `unacked` for the visibility timeout (an hour), and gokiq's ledger
re-publishes their jobs after `delivery_timeout` (300 s). The same gap upstream:
celery/celery#1307 ("Redis: Restore unacked on broker reconnection", closed unfixed).

A restart can also cut the write that records a delivery in `unacked`, after BRPOP took the
message from its queue, or only that write's reply. The worker then saw an error and never got
the message, which is in `unacked` or nowhere in the broker (seen in the Redis-restart e2e test).

Here such a restore or write, when it fails on a connection error, leaves its delivery tags
(and, for a write, the message) in the process's memory, per broker. The process's next
channel to connect to that broker then restores them, with kombu's own atomic
`restore_by_tag`, or puts back a message that never reached `unacked`. A tag is skipped when:
- the message is no longer unacked (acked, or restored by someone else);
- it was delivered again after the failure: its `unacked_index` score, the delivery time, is
  newer, so another worker holds it now;
- a job of this worker still holds it (Celery tracks the request as reserved or running): that
  job acks it when done.
A job that finished while Redis was down could not ack its message. Its tag is not restored
(that would run a done job again if its ledger entry is not settled yet); the ack is completed
instead.

The call that records a BRPOPed message may also pop more (kombu_redis.Channel.record_and_pop),
recording each in `unacked` under that call's delivery time. When a connection error cuts that
call, the process never got those messages: the time is remembered, and the next channel
restores every message recorded under it that no job of this worker holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, NamedTuple

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class Unsettled(NamedTuple):
    """A delivery whose record in `unacked`, restore or ack failed."""

    failed_at: float
    acked: bool = False  # its job acked it: complete the ack, never restore it
    message: tuple | None = None  # (payload, exchange, routing key), if its record failed

    def merge(self, other: Unsettled) -> Unsettled:
        # The earliest failure guards best against a delivery since; an ack always wins.
        return Unsettled(
            min(self.failed_at, other.failed_at),
            self.acked or other.acked,
            self.message or other.message,
        )


# Per process, because the channel and the connection that failed are gone when the broker is
# back: {broker: {delivery tag: Unsettled}}.
_lock = threading.Lock()
_unsettled: dict[str, dict[str, Unsettled]] = {}
# {broker: {delivery time of a cut call that popped messages}}: the time, as sent to Redis.
_cut_pops: dict[str, set[str]] = {}


def broker_of(channel: Any) -> str | None:
    """The broker (URL without password, and key prefix) whose `unacked` hash `channel` uses;
    None once the channel is closed."""
    client = getattr(channel.connection, "client", None)
    return None if client is None else f"{client.as_uri()} {channel.global_keyprefix}"


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._broker = broker_of(self.channel)  # while connected: it fails later, closed

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            self._remember_unrecorded(message, delivery_tag)
            raise

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            self._remember_acked([delivery_tag])
            raise

    def _remember_unrecorded(self, message: Any, delivery_tag: str) -> None:
        """The write recording `message` in `unacked` failed (or only its reply)."""
        delivery = message.delivery_info
        what = (message._raw, delivery["exchange"], delivery["routing_key"])
        self._remember([delivery_tag], Unsettled(time.time(), message=what))

    def _remember_acked(self, tags: list[str]) -> None:
        """These messages' jobs acked them, but removing them from `unacked` failed."""
        if tags:
            self._remember(tags, Unsettled(time.time(), acked=True))

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors:
            self._remember(tags, Unsettled(time.time()))
            log.warning("broker down: %d unacked messages to restore once it is back", len(tags))
            raise

    def _remember(self, tags: list[str], unsettled: Unsettled) -> None:
        if self._broker is not None:
            _remember(self._broker, dict.fromkeys(tags, unsettled))

    def _remember_cut_pop(self, delivered_at: str) -> None:
        """A call that popped messages and recorded them under `delivered_at` (its score in
        `unacked_index`, as sent) failed on a connection error: it may have run."""
        if self._broker is not None:
            with _lock:
                _cut_pops.setdefault(self._broker, set()).add(delivered_at)


def _remember(broker: str, tags: dict[str, Unsettled]) -> None:
    with _lock:
        known = _unsettled.setdefault(broker, {})
        for tag, unsettled in tags.items():
            known[tag] = known[tag].merge(unsettled) if tag in known else unsettled


def settle_unsettled(channel: Any) -> None:
    """Restore or ack what failed for this (connected) channel's broker; what fails again stays
    for the process's next channel."""
    broker = broker_of(channel)
    with _lock:
        pending = _unsettled.pop(broker, None) if broker is not None else None
        cut_pops = _cut_pops.pop(broker, None) if broker is not None else None
    if not pending and not cut_pops:
        return
    pending, cut_pops = pending or {}, cut_pops or set()
    held = _tags_of_jobs_held()
    outcomes: Counter[str | None] = Counter()
    try:
        with channel.conn_or_acquire() as client:
            for tag, unsettled in list(pending.items()):
                if tag not in held:
                    outcomes[_settle(channel, client, tag, unsettled)] += 1
                del pending[tag]
            for delivered_at in list(cut_pops):
                outcomes["restored"] += _restore_cut_pop(channel, client, delivered_at, held)
                cut_pops.discard(delivered_at)
    except channel.connection_errors:
        _remember(broker, pending)
        if cut_pops:
            with _lock:
                _cut_pops.setdefault(broker, set()).update(cut_pops)
    restored, acked = outcomes["restored"], outcomes["acked"]
    log.info("after a broker outage: %d unacked messages restored, %d acked", restored, acked)


def _settle(channel: Any, client: Any, tag: str, unsettled: Unsettled) -> str | None:
    """Restore or ack one delivery: "restored", "acked", or None when it is not ours to."""
    # ZSCORE is not among the commands kombu's client prefixes with global_keyprefix.
    delivered_at = client.zscore(f"{channel.global_keyprefix}{channel.unacked_index_key}", tag)
    if delivered_at is None:  # not in `unacked`: acked, restored, or never recorded there
        if unsettled.message is None:
            return None
        with client.pipeline() as pipe:
            channel._do_restore_message(*unsettled.message, pipe)
            pipe.execute()
        return "restored"
    if delivered_at > unsettled.failed_at:  # delivered again since: someone else's now
        return None
    if unsettled.acked:
        channel.qos._remove_from_indices(tag, client.pipeline()).execute()
        return "acked"
    channel.qos.restore_by_tag(tag, client=client)
    return "restored"


def _restore_cut_pop(channel: Any, client: Any, delivered_at: str, held: set[str]) -> int:
    """Restore the messages a cut call recorded under `delivered_at`: how many.

    The call is known by its score alone: a delivery another worker recorded at the very same
    float time (steps of ~0.24 us) would be restored too, and its job run again only if its
    claim in the ledger let it (it does not while the first run holds or settled it)."""
    index = f"{channel.global_keyprefix}{channel.unacked_index_key}"  # ZRANGEBYSCORE: unprefixed
    tags = [t.decode() for t in client.zrangebyscore(index, delivered_at, delivered_at)]
    for tag in tags:
        if tag not in held:
            channel.qos.restore_by_tag(tag, client=client)
    return len(set(tags) - held)


def _tags_of_jobs_held() -> set[str]:
    """Delivery tags of the requests this worker process still tracks (reserved or running)."""
    requests = [*worker_state.reserved_requests, *worker_state.active_requests]
    return {getattr(r.message, "delivery_tag", None) for r in requests} - {None}
