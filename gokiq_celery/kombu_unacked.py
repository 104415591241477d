"""Messages a broker outage left in kombu's `unacked` hash, handed back once the broker is back.

kombu's Redis transport records every message it delivers to a worker in the broker's `unacked`
hash, and when the worker's channel closes it pushes the ones still unacked back onto their
queues (`QoS.restore_unacked`): the messages a worker had prefetched but not started go to
whichever worker reconnects first. Celery's consumer closes its channel when it loses the broker,
so during a Redis restart that restore runs while Redis is down: it fails, and kombu never tries
again. The messages then wait in `unacked` for the visibility timeout (an hour; gokiq's ledger
re-publishes their jobs at `delivery_timeout`, 300 s). The same gap upstream: celery/celery#1307
("Redis: Restore unacked on broker reconnection", closed unfixed).

Here a restore that fails for a connection error leaves the tags it could not restore in the
process's memory, per broker, and the process's next channel to connect to that broker restores
them. A tag is left alone when the message is no longer unacked (acked, or restored by someone),
when it was delivered again after the failure (its `unacked_index` score, the delivery time, is
newer: another worker holds it now), or when a job of this worker still holds it (Celery tracks
the request as reserved or running: that job acks it when done). Restoring one is kombu's own
atomic `restore_by_tag`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

# Per process, because the channel and the connection that failed are gone when the broker is
# back: {broker: {delivery tag: when restoring it failed}}.
_lock = threading.Lock()
_unrestored: dict[str, dict[str, float]] = {}


def broker_of(channel: Any) -> str | None:
    """The broker (URL without password, and key prefix) whose `unacked` hash `channel` uses;
    None once the channel is closed."""
    client = getattr(channel.connection, "client", None)
    return None if client is None else f"{client.as_uri()} {channel.global_keyprefix}"


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._broker = broker_of(self.channel)  # while connected: restore_unacked runs later

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors:
            if self._broker is not None and tags:
                _remember(self._broker, dict.fromkeys(tags, time.time()))
                log.warning(
                    "broker down: %d unacked messages to restore once it is back", len(tags)
                )
            raise


def restore_unrestored(channel: Any) -> None:
    """Restore what a failed restore left for this (connected) channel's broker; what the broker
    refuses again stays for the next channel."""
    broker = broker_of(channel)
    with _lock:
        pending = _unrestored.pop(broker, None) if broker is not None else None
    if not pending:
        return
    held = _tags_of_jobs_held()
    restored = 0
    try:
        with channel.conn_or_acquire() as client:
            for tag in list(pending):
                if tag not in held and _delivered_before(channel, client, tag, pending[tag]):
                    channel.qos.restore_by_tag(tag, client=client)
                    restored += 1
                del pending[tag]
    except channel.connection_errors:
        _remember(broker, pending)
    log.info("restored %d unacked messages a broker outage had kept", restored)


def _remember(broker: str, tags: dict[str, float]) -> None:
    with _lock:
        _unrestored.setdefault(broker, {}).update(tags)


def _delivered_before(channel: Any, client: Any, tag: str, failed_at: float) -> bool:
    # ZSCORE is not among the commands kombu's client prefixes with global_keyprefix.
    score = client.zscore(f"{channel.global_keyprefix}{channel.unacked_index_key}", tag)
    return score is not None and score <= failed_at


def _tags_of_jobs_held() -> set[str]:
    """Delivery tags of the requests this worker process still tracks (reserved or running)."""
    requests = [*worker_state.reserved_requests, *worker_state.active_requests]
    return {getattr(r.message, "delivery_tag", None) for r in requests} - {None}
