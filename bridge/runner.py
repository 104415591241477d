"""The bridge process: the fetch → hand over → publish loop, the scheduler and housekeeping threads,
the status server, and a clean shutdown.

Threads: the main thread fetches and publishes (it alone uses the broker connection); the
scheduler thread polls `retry`/`schedule`; the housekeeping thread renews the heartbeat,
recovers dead bridges and refreshes the gauges; the HTTP thread serves /metrics.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import redis

from gokiq_celery.http import StatusServer
from gokiq_celery.messages import new_delivery_token
from gokiq_celery.settings import ConfigError, Settings
from gokiq_celery.sidekiq.job import InvalidJob, Job, epoch_seconds, poison_entry
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_history.recorder import open_recorder

from .fetch import Batch, QueueOrder, ReliableFetcher
from .metrics import BridgeMetrics
from .publish import Backpressure, Publisher
from .retrying import Backoff
from .scheduler import Scheduler

log = logging.getLogger("gokiq.bridge")


def new_bridge_id() -> str:
    """Unique per process run: a restarted bridge never mistakes a dead run's lists for its own."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class Bridge:
    # An idle bridge blocks (BLMOVE) on its first queue for up to IDLE_WAIT, so a job pushed
    # there is picked up at once; the other queues are polled at that interval by the Lua fetch
    # (a script cannot block). A Redis without BLMOVE (< 6.2) gets the poll alone, IDLE_SLEEP.
    IDLE_WAIT = 0.05
    IDLE_SLEEP = 0.05
    PENDING_SLEEP = 0.01  # Celery queue full: re-check soon, workers drain it fast
    BREAKER_SLEEP = 0.1
    GAUGE_INTERVAL = 1.0
    OVERDUE_INTERVAL = 1.0  # how often the ledger is checked for overdue deliveries
    WORKER_RECOVERY_INTERVAL = 5.0  # how often dead worker processes' deliveries are looked for

    def __init__(
        self,
        settings: Settings,
        *,
        bridge_id: str | None = None,
        store: SidekiqStore | None = None,
        publisher: Publisher | None = None,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.bridge_id = bridge_id or new_bridge_id()
        self.store = store or SidekiqStore.from_settings(settings)
        self.metrics = metrics or BridgeMetrics()
        self.queues = [spec.name for spec in settings.queues]
        self.order = QueueOrder(settings.queues, settings.strict)
        self.fetcher = ReliableFetcher(self.store, self.bridge_id, self.queues)
        self.publisher = publisher or Publisher(settings)
        self.backpressure = Backpressure(settings, self.publisher, self.store, self.metrics)
        self.scheduler = Scheduler(
            self.store,
            self.bridge_id,
            self.metrics,
            sidekiq_version=self.store.versions(settings.sidekiq_version),
            poll_interval=settings.scheduler_poll_interval,
        )
        self.history = open_recorder(settings, self.metrics.registry)  # the job history
        self.scheduler.history = self.history
        self.stopping = threading.Event()
        self.batch: Batch | None = None  # fetched, not yet published
        self.broker_ok = False
        self.blocking_wait = True  # until Redis refuses BLMOVE
        self._next_overdue_check = 0.0
        self.status: StatusServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the bridge to stop (safe from a signal handler): no new fetches from now on."""
        self.stopping.set()

    def run(self) -> int:
        """Run until `stop()`; returns the process exit code (0: everything given back)."""
        self._serve_status()
        log.info(
            "gokiq-bridge starting",
            extra={
                "bridge": self.bridge_id,
                "queues": self.queues,
                "strict": self.order.strict,
                "redis": redacted(self.settings.redis_url),
                "broker": redacted(self.settings.broker_url),
            },
        )
        if self._register():
            self._start_thread("bridge-scheduler", self.scheduler.run, self.stopping)
            self._start_thread("bridge-housekeeping", self._housekeeping)
            self._fetch_loop()
        return self._shutdown()

    def _register(self) -> bool:
        """Announce ourselves and give back dead bridges' jobs; retried until Redis answers."""
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                self.fetcher.register(self.settings.bridge_heartbeat_ttl)
                self._recover()
                return True
            except redis.RedisError as exc:
                delay = backoff.next()
                log.warning("redis unavailable at start (%s), retrying in %.1fs", exc, delay)
                self.stopping.wait(delay)
        return False

    def _shutdown(self) -> int:
        for thread in self._threads:
            thread.join(timeout=15)
        code = 0
        try:
            returned = self.fetcher.release()
            log.info("gokiq-bridge stopped", extra={"bridge": self.bridge_id, "returned": returned})
        except redis.RedisError as exc:
            # Nothing is lost: the jobs stay in our in-flight lists and the next bridge to see
            # our heartbeat expire gives them back.
            log.error("could not give back in-flight jobs (%s); recovery will", exc)
            code = 1
        self.publisher.close()
        self.history.close()
        if self.status is not None:
            self.status.stop()
        return code

    def _start_thread(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_status(self) -> None:
        if not self.settings.bridge_metrics_port:
            return
        bind, port = self.settings.bridge_bind, self.settings.bridge_metrics_port
        try:
            self.status = StatusServer(
                bind, port, self.metrics.registry, self.ready, name="bridge-http"
            )
        except OSError as exc:
            raise ConfigError(
                f"bridge_metrics_port: cannot listen on {bind}:{port} ({exc.strerror})"
            ) from None
        self.status.start()

    def ready(self) -> bool:
        """Redis answers and the broker did on the last attempt."""
        return bool(self.store.redis.ping()) and self.broker_ok

    # -- fetch, hand over, publish ----------------------------------------------------------

    def _fetch_loop(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                pause = self.step()
                backoff.reset()
            except Exception as exc:
                pause = backoff.next()
                log.warning(
                    "%s: %s; retrying in %.1fs", type(exc).__name__, exc, pause, exc_info=True
                )
            if pause:
                self.stopping.wait(pause)

    def step(self) -> float:
        """One round: fetch a batch (unless one is held) and deliver it. Returns how long to
        wait before the next round. A batch that fails half way is kept and retried."""
        if self.batch is None:
            self.republish_overdue()
            self._broker_call(self.backpressure.refresh, self.queues)
            if self.backpressure.breaker_is_open:
                return self.BREAKER_SLEEP
            allowed = self.backpressure.allowed(self.order.next())
            if not allowed:
                return self.PENDING_SLEEP
            limit = min(self.settings.publish_batch_size, *map(self.backpressure.room, allowed))
            self.batch = self.fetcher.fetch(allowed, limit) or self._wait_for_work(allowed)
            if self.batch is None:
                return 0.0 if self.blocking_wait else self.IDLE_SLEEP
        self._deliver(self.batch)
        self.batch = None
        return 0.0

    def _wait_for_work(self, allowed: list[str]) -> Batch | None:
        if not self.blocking_wait:
            return None
        try:
            return self.fetcher.wait(allowed, self.IDLE_WAIT)
        except redis.ResponseError as exc:
            self.blocking_wait = False
            log.warning("BLMOVE refused (%s): polling every %.0f ms", exc, self.IDLE_SLEEP * 1000)
            return None

    def _deliver(self, batch: Batch) -> None:
        while batch.poison:
            raw, reason = batch.poison[0]
            self.fetcher.bury(batch.queue, raw, reason)
            self.history.invalid(raw, batch.queue)
            batch.poison.pop(0)
            self.metrics.poison.labels(batch.queue, reason).inc()
            log.warning(
                "not a job in queue %s: moved to the dead set (%s)",
                batch.queue,
                reason,
                extra={"queue": batch.queue, "reason": reason, "bytes": len(raw)},
            )
        if not batch.handed_over:
            # Until the broker has the batch, only this bridge can deliver it: if we die, the
            # ledger hands it to another bridge as soon as our heartbeat would have expired.
            deadline = time.time() + self.settings.bridge_heartbeat_ttl
            if dropped := self.fetcher.hand_over(batch, deadline):
                log.warning(
                    "%d jobs were given back to queue %s while this bridge stalled: not published",
                    len(dropped),
                    batch.queue,
                    extra={"queue": batch.queue, "jids": [job.jid for job in dropped][:20]},
                )
        if not batch.published:
            self._broker_call(self.publisher.publish, batch.queue, batch.jobs, batch.tokens)
            self.store.ledger.extend(batch.tokens, time.time() + self.settings.delivery_timeout)
            batch.published = True
            self.backpressure.note_published(batch.queue, len(batch.jobs))
            self.metrics.jobs_moved.labels(batch.queue).inc(len(batch.jobs))
            self.history.enqueued(batch.jobs, batch.queue)
            if log.isEnabledFor(logging.DEBUG):
                for job in batch.jobs:
                    log.debug(
                        "published",
                        extra=job.log_context(batch.queue),
                    )

    def republish_overdue(self) -> int:
        """Publish again the ledger entries no worker settled in time (a message lost with a
        killed worker, or held unacked by one); each gets a fresh token, so the old message, if
        it ever shows up, is skipped. Returns how many were published."""
        now = time.time()
        if now < self._next_overdue_check:
            return 0
        self._next_overdue_check = now + self.OVERDUE_INTERVAL
        tokens = [new_delivery_token() for _ in range(self.settings.publish_batch_size)]
        taken = self.store.ledger.take_overdue(
            now, tokens, now + self.settings.bridge_heartbeat_ttl
        )
        by_queue: dict[str, list[tuple[str, Job]]] = {}
        for token, queue, payload in taken:
            try:
                by_queue.setdefault(queue, []).append((token, Job.parse(payload)))
            except InvalidJob as exc:  # entered by an older gokiq that let it through
                self._bury_delivery(token, payload, exc.reason)
        for queue, entries in by_queue.items():
            tokens, jobs = zip(*entries, strict=True)
            self._broker_call(self.publisher.publish, queue, jobs, tokens)
            self.store.ledger.extend(tokens, time.time() + self.settings.delivery_timeout)
            label = queue if queue in self.queues else "(other)"  # a retry_queue: any string
            self.metrics.republished.labels(label).inc(len(jobs))
            log.warning(
                "published %d jobs again: no worker settled them in time",
                len(jobs),
                extra={"queue": queue, "jids": [job.jid for job in jobs][:20]},
            )
        return len(taken)

    def _bury_delivery(self, token: str, payload: str, reason: str) -> None:
        """A ledger entry that is not a job: dead set (saying why), then out of the ledger.
        Published, it would fail every round and hold back the whole fetch loop."""
        self.store.dead.add(poison_entry(payload, reason))
        self.store.ledger.settle([token])
        log.warning("not a job in the delivery ledger: moved to the dead set (%s)", reason)

    def _broker_call(self, func, *args):
        try:
            result = func(*args)
        except Exception:
            self.broker_ok = False
            self.publisher.reset()  # reconnect on the next call
            raise
        self.broker_ok = True
        return result

    # -- housekeeping: heartbeat, recovery, gauges --------------------------------------------

    def _housekeeping(self) -> None:
        ttl = self.settings.bridge_heartbeat_ttl
        tick = min(ttl / 3, self.GAUGE_INTERVAL)
        next_recovery = time.monotonic() + self.settings.bridge_recovery_interval
        next_workers = time.monotonic()
        while not self.stopping.wait(tick):
            try:
                self.fetcher.register(ttl)
                self.refresh_gauges()
                if time.monotonic() >= next_workers:
                    next_workers = time.monotonic() + self.WORKER_RECOVERY_INTERVAL
                    self.recover_dead_workers()
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + self.settings.bridge_recovery_interval
                    self._recover()
            except Exception as exc:
                log.warning("housekeeping: %s: %s", type(exc).__name__, exc)

    def _recover(self) -> None:
        for bridge_id, count in self.fetcher.recover_dead_bridges().items():
            log.warning(
                "recovered %d jobs from dead bridge %s",
                count,
                bridge_id,
                extra={"dead_bridge": bridge_id, "returned": count},
            )

    def recover_dead_workers(self) -> int:
        """Deliveries of worker processes that died go back out now, not at their deadline."""
        count, dead = self.store.ledger.recover_dead_workers(self.settings.delivery_timeout)
        if dead:
            log.warning(
                "worker processes stopped giving signs of life: %d deliveries published again",
                count,
                extra={"dead_workers": dead[:20], "returned": count},
            )
        return count

    def refresh_gauges(self) -> None:
        now = time.time()
        for queue, (size, oldest) in self.store.queues.sizes_and_oldest(self.queues).items():
            self.metrics.queue_size.labels(queue).set(size)
            self.metrics.queue_latency.labels(queue).set(_latency(oldest, now))
        for name, size in self.store.stats.set_sizes().items():
            self.metrics.set_size.labels(name).set(size)
        self.metrics.inflight.set(self.fetcher.inflight_count())
        self.metrics.deliveries.set(self.store.ledger.pending())


def _latency(oldest: bytes | None, now: float) -> float:
    """Sidekiq's `Queue#latency`: now - enqueued_at of the next job (created_at if absent)."""
    if not oldest:
        return 0.0
    try:
        job = Job.parse(oldest)
    except InvalidJob:
        return 0.0
    at = epoch_seconds(job.get("enqueued_at", job.get("created_at")))
    return max(0.0, now - at) if at else 0.0
