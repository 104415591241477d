"""Messages a broker outage left in kombu's `unacked` hash, handed back once the broker is back.

kombu's Redis transport records every message it delivers to a worker in the broker's `unacked`
hash. When the worker's channel closes it pushes the ones still unacked back onto their queues
(`QoS.restore_unacked`), so the messages a worker had taken but not run go to whichever worker
reconnects first. Celery's consumer closes its channel when it loses the broker, so in a Redis
restart that restore runs while Redis is down. It fails, and kombu never tries again. The
messages then wait in `unacked` for the visibility timeout (an hour), and gokiq's ledger
re-publishes their jobs after `delivery_timeout` (300 s). The same gap upstream:
celery/celery#1307 ("Redis: Restore unacked on broker reconnection", closed unfixed).

Here a restore that fails on a connection error leaves its delivery tags in the process's
memory, per broker. The process's next channel to connect to that broker then restores them,
using kombu's own atomic `restore_by_tag`. A tag is skipped when:
- the message is no longer unacked (acked, or restored by someone else);
- it was delivered again after the failure: its `unacked_index` score, the delivery time, is
  newer, so another worker holds it now;
- a job of this worker still holds it (Celery tracks the request as reserved or running): that
  job acks it when done.
A job that finished while Redis was down could not ack its message. Its tag is not restored
(that would run a done job again if its ledger entry is not settled yet); the ack is completed
instead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NamedTuple

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class Unsettled(NamedTuple):
    """A tag whose restore or ack failed: since when, and whether its job acked it."""

    failed_at: float
    acked: bool

    def merge(self, other: Unsettled) -> Unsettled:
        # The earliest failure guards best against a delivery since; an ack always wins.
        return Unsettled(min(self.failed_at, other.failed_at), self.acked or other.acked)


# Per process, because the channel and the connection that failed are gone when the broker is
# back: {broker: {delivery tag: Unsettled}}.
_lock = threading.Lock()
_unsettled: dict[str, dict[str, Unsettled]] = {}


def broker_of(channel: Any) -> str | None:
    """The broker (URL without password, and key prefix) whose `unacked` hash `channel` uses;
    None once the channel is closed."""
    client = getattr(channel.connection, "client", None)
    return None if client is None else f"{client.as_uri()} {channel.global_keyprefix}"


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._broker = broker_of(self.channel)  # while connected: it fails later, closed

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            self._remember([delivery_tag], acked=True)
            raise

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors:
            self._remember(tags, acked=False)
            log.warning("broker down: %d unacked messages to restore once it is back", len(tags))
            raise

    def _remember(self, tags: list[str], acked: bool) -> None:
        if self._broker is not None:
            _remember(self._broker, dict.fromkeys(tags, Unsettled(time.time(), acked)))


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
    if not pending:
        return
    held = _tags_of_jobs_held()
    restored = acked = 0
    try:
        with channel.conn_or_acquire() as client:
            for tag, unsettled in list(pending.items()):
                if tag not in held and _delivered_before(channel, client, tag, unsettled):
                    if unsettled.acked:
                        channel.qos._remove_from_indices(tag, client.pipeline()).execute()
                        acked += 1
                    else:
                        channel.qos.restore_by_tag(tag, client=client)
                        restored += 1
                del pending[tag]
    except channel.connection_errors:
        _remember(broker, pending)
    log.info("after a broker outage: %d unacked messages restored, %d acked", restored, acked)


def _delivered_before(channel: Any, client: Any, tag: str, unsettled: Unsettled) -> bool:
    # ZSCORE is not among the commands kombu's client prefixes with global_keyprefix.
    score = client.zscore(f"{channel.global_keyprefix}{channel.unacked_index_key}", tag)
    return score is not None and score <= unsettled.failed_at


def _tags_of_jobs_held() -> set[str]:
    """Delivery tags of the requests this worker process still tracks (reserved or running)."""
    requests = [*worker_state.reserved_requests, *worker_state.active_requests]
    return {getattr(r.message, "delivery_tag", None) for r in requests} - {None}
