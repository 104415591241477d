"""Publishing jobs to Celery, and holding back while Celery cannot keep up.

Each job becomes one `gokiq.perform(payload_text, queue, delivery=token)` message (Celery
protocol 2, JSON), with task id = jid and shown under the job's class name. The bridge has its
own small Celery app so it never imports the workers' `celeryconfig.py`.

Why not `app.send_task`: it routes every message through an exchange lookup (one Redis round
trip per message on the Redis transport) and tops out near 6,000 messages/s. The messages
(bridge/envelope.py) go to the default exchange ("", routing key = queue name, which both Redis
and AMQP deliver straight to the queue of that name): on AMQP through kombu's Producer, with
one wait for the broker's confirms per batch (bridge/confirms.py), on Redis as one LPUSH per
batch (see bench/bridge.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import amqp
import redis
from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.exceptions import ChannelError
from kombu.transport import redis as kombu_redis

from gokiq_celery.settings import Settings
from gokiq_celery.sidekiq.job import Job
from gokiq_celery.sidekiq.redis_client import CONNECT_TIMEOUT, SOCKET_TIMEOUT
from gokiq_celery.sidekiq.store import SidekiqStore

from .confirms import BatchConfirms
from .envelope import PERSISTENT, TaskMessages
from .metrics import BridgeMetrics

log = logging.getLogger(__name__)

# Seconds an AMQP broker has to confirm a published batch before it counts as not published.
CONFIRM_TIMEOUT = 10.0


def broker_connection(broker_url: str) -> Connection:
    """A kombu connection to exactly `broker_url`.

    Not `app.connection_for_write()`: Celery lets the CELERY_BROKER_URL environment variable
    win over the configured broker, which would make `--broker-url` silently ignored.
    """
    scheme = urlsplit(broker_url).scheme
    options = {}
    if scheme in {"redis", "rediss"}:
        # A stalled broker must raise (and be retried), not hang the bridge forever: the same
        # timeouts as every client of Sidekiq's Redis.
        options = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    # AMQP: only a confirmed publish lets the bridge give the batch's ledger entries their long
    # deadline (`delivery_timeout`); until then a lost batch is published again soon. The
    # confirms are waited for per batch (bridge/confirms.py), not per message (`confirm_publish`).
    return Connection(broker_url, transport_options=options, connect_timeout=CONNECT_TIMEOUT)


class Publisher:
    """Sends batches of jobs to their Celery queues over one reused connection."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.messages = TaskMessages(app)
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._declared: set[str] = set()
        self._broker_redis: redis.Redis | None = None  # the fast path's client, per connection
        self._confirms: BatchConfirms | None = None  # AMQP: the channel's publisher confirms
        self.fast_path = True  # one LPUSH per batch on a Redis broker (see _publish_redis)

    # -- connection -------------------------------------------------------------------------

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            self._connection = broker_connection(self.settings.broker_url)
            self._connection.ensure_connection(max_retries=1)
            self._producer = Producer(self._connection.default_channel)
            self._declared.clear()
            if isinstance(self._producer.channel, amqp.Channel):
                self._confirms = BatchConfirms(self._producer.channel, CONFIRM_TIMEOUT)
        return self._producer

    def reset(self) -> None:
        """Drop the connection after an error; the next call opens a fresh one."""
        connection, self._connection, self._producer = self._connection, None, None
        self._broker_redis, self._confirms = None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        self.reset()

    def _declare(self, producer: Producer, celery_queue: str) -> None:
        # Publishing to the default exchange drops messages for a queue that does not exist
        # (AMQP), so declare it first, the way the workers' `task_queues` do.
        if celery_queue not in self._declared:
            Queue(celery_queue).bind(producer.channel).declare()
            self._declared.add(celery_queue)

    # -- publishing -------------------------------------------------------------------------

    def publish(self, queue: str, jobs: Sequence[Job], tokens: Sequence[str]) -> None:
        """Publish jobs from Sidekiq `queue`, each with its delivery token (same order);
        returns once the broker accepted all of them."""
        if not jobs:
            return
        celery_queue = self.settings.celery_queue(queue)
        producer = self._ensure_producer()
        self._declare(producer, celery_queue)
        if self.fast_path and _is_kombu_redis(producer.channel):
            self._publish_redis(producer.channel, jobs, tokens, queue, celery_queue)
            return
        batch = producer.batch(max_size=2 * len(jobs) + 1) if hasattr(producer, "batch") else None
        with batch or contextlib.nullcontext():
            for job, token in zip(jobs, tokens, strict=True):
                message = self.messages.task_message(job, queue, token)
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=celery_queue,
                    serializer="json",
                    headers=message.headers,
                    delivery_mode=PERSISTENT,
                    retry=False,
                    declare=None,
                    **message.properties,
                )
                if self._confirms is not None:
                    self._confirms.published()
        if self._confirms is not None:
            self._confirms.wait()

    def _publish_redis(
        self, channel, jobs: Sequence[Job], tokens: Sequence[str], queue: str, celery_queue: str
    ) -> None:
        """The Redis transport's publish, for a whole batch in one LPUSH.

        kombu's Producer sends one LPUSH per message; here each envelope is the text kombu's
        `basic_publish` would write (identical: see tests/test_bridge_publish.py) and the batch
        goes in one command, in order.
        """
        envelopes = [
            self.messages.redis_envelope(channel, job, token, queue, celery_queue)
            for job, token in zip(jobs, tokens, strict=True)
        ]
        if self._broker_redis is None:
            # kombu's conn_or_acquire() builds a new client per call, a fifth of a batch's time.
            self._broker_redis = redis.Redis(connection_pool=channel.pool)
        self._broker_redis.lpush(channel._q_for_pri(celery_queue, 0), *envelopes)

    def pending(self, celery_queue: str) -> int:
        """Messages waiting in a Celery queue (not yet taken by a worker)."""
        producer = self._ensure_producer()
        try:
            return producer.channel.queue_declare(queue=celery_queue, passive=True).message_count
        except ChannelError:
            return 0  # Redis transport: the queue does not exist yet, so it is empty


def _is_kombu_redis(channel) -> bool:
    # Only kombu's own Redis channel, with the methods the fast path relies on; anything else
    # (AMQP, a kombu that changed) takes the Producer path.
    return isinstance(channel, kombu_redis.Channel) and all(
        hasattr(channel, name)
        for name in ("prepare_message", "_inplace_augment_message", "_q_for_pri", "pool")
    )


class Backpressure:
    """Decides which queues the bridge may fetch from now, and how many jobs.

    A Sidekiq queue is held back once its Celery queue holds `pending_limit` messages, until
    there is room for `refill_at` again; everything is held while the sidecar's circuit
    breaker is open. The jobs simply wait
    in Sidekiq's queues. Counts are read at most every `REFRESH` seconds and estimated in
    between (what was read plus what we published since), re-read sooner when near the limit.
    """

    REFRESH = 0.15
    REFRESH_WHEN_FULL = 0.02

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        store: SidekiqStore,
        metrics: BridgeMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.limit = settings.pending_limit
        # A held-back queue is refilled once it has room for a real batch (half the limit, a
        # batch at most), not one job at a time: each round costs the same fixed work (fetch,
        # hand-over, publish) whatever its size. The other half keeps the workers busy meanwhile.
        self.refill_at = max(1, min(settings.publish_batch_size, self.limit // 2))
        self.pending: dict[str, int] = {}
        self.breaker_is_open = False
        self._checked_at = float("-inf")
        self._breaker = None

    def _celery_queues(self, queues: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(self.settings.celery_queue(q) for q in queues))

    def refresh(self, queues: Sequence[str]) -> None:
        """Read the pending counts and the breaker if the last reading is old enough."""
        full = self.breaker_is_open or any(
            self.limit - self.pending.get(cq, 0) < self.refill_at
            for cq in self._celery_queues(queues)
        )
        interval = self.REFRESH_WHEN_FULL if full else self.REFRESH
        now = self.clock()
        if now - self._checked_at < interval:
            return
        for cq in self._celery_queues(queues):
            self.pending[cq] = self.publisher.pending(cq)
        self._read_breaker()
        self._checked_at = now

    def _read_breaker(self) -> None:
        if self._breaker is None:
            self._breaker = self.store.breaker.storage()
        raw_open = self.store.breaker.tripped(self._breaker)
        self.breaker_is_open = raw_open and self.store.breaker.is_open(
            self._breaker, reset_timeout=self.settings.breaker_reset_timeout
        )
        self.metrics.breaker_open.set(1 if raw_open else 0)
        self.metrics.paused.labels("breaker").set(1 if self.breaker_is_open else 0)

    def room(self, queue: str) -> int:
        return self.limit - self.pending.get(self.settings.celery_queue(queue), 0)

    def allowed(self, order: Sequence[str]) -> list[str]:
        """The queues of `order` the bridge may fetch from now, order kept."""
        if self.breaker_is_open:
            return []
        allowed = [q for q in order if self.room(q) >= self.refill_at]
        self.metrics.paused.labels("pending").set(0 if len(allowed) == len(order) else 1)
        return allowed

    def note_published(self, queue: str, count: int) -> None:
        cq = self.settings.celery_queue(queue)
        self.pending[cq] = self.pending.get(cq, 0) + count
