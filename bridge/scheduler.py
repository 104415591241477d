"""The poller: due jobs out of Sidekiq's `retry` and `schedule` sets onto their queues.

It does what Sidekiq's scheduler does (retry first, then schedule; a new `enqueued_at`; SADD
`queues`; LPUSH `queue:<payload queue>`) but without ever losing a job or mangling it:

1. a Lua script ZREMs up to `BATCH` due members and keeps them in this bridge's durable moving
   list (bytes untouched: Lua's cjson would round floats such as created_at);
2. Python sets `enqueued_at` with `Job.replace`, which keeps every other field byte for byte;
3. one MULTI pushes them onto their queues and drops them from the moving list.

If the bridge dies between 1 and 3, recovery puts the moving list back into its set. Only one
bridge's ZREM can succeed for a member, so any number of bridges can poll together.
"""

from __future__ import annotations

import logging
import threading
import time

from gokiq_celery.sidekiq.job import InvalidJob, Job, poison_entry, timestamp
from gokiq_celery.sidekiq.keys import RETRY, SCHEDULED_SETS
from gokiq_celery.sidekiq.scheduled import RETRY_GRACE
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_celery.sidekiq.version import SidekiqVersionResolver, SidekiqVersionUnknown
from gokiq_history.recorder import NULL_RECORDER

from .metrics import BridgeMetrics
from .retrying import Backoff

log = logging.getLogger(__name__)


class Scheduler:
    BATCH = 100
    history = NULL_RECORDER  # the bridge sets its recorder: what moves is recorded as enqueued

    def __init__(
        self,
        store: SidekiqStore,
        bridge_id: str,
        metrics: BridgeMetrics,
        sidekiq_version: int | str | SidekiqVersionResolver = 7,
        poll_interval: float = 0.25,
        retry_grace: float = RETRY_GRACE,
    ) -> None:
        self.store = store
        self.bridge_id = bridge_id
        self.metrics = metrics
        self.versions = SidekiqVersionResolver.of(sidekiq_version)
        self.poll_interval = poll_interval
        # A retry's own Celery countdown claims it when due; the poller takes it only once it
        # is `retry_grace` late (a dead worker's timer), whoever is first runs it (ZREM).
        self.retry_grace = retry_grace
        self.waiting = False  # for the version; said once in the log

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; Redis errors are logged and retried with a backoff."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                self.move_due()
            except SidekiqVersionUnknown as exc:
                self._wait_for_version(exc)
                stop.wait(self.poll_interval)
                continue
            except Exception:
                delay = backoff.next()
                log.exception("scheduler: cannot move due jobs, retrying in %.1fs", delay)
                stop.wait(delay)
                continue
            backoff.reset()
            if self.waiting:
                self.waiting = False
                log.info("scheduler: Sidekiq version known, moving due jobs")
            stop.wait(self.poll_interval)

    def _wait_for_version(self, reason: SidekiqVersionUnknown) -> None:
        if not self.waiting:
            self.waiting = True
            log.warning("scheduler: no due job moved until the version is known: %s", reason)

    def move_due(self, now: float | None = None) -> int:
        """Move every job due at `now` (default: the current time); returns how many moved.
        Raises SidekiqVersionUnknown, moving nothing, while `enqueued_at`'s format is unknown."""
        now = time.time() if now is None else now
        major = self.versions.require().major
        moved = 0
        for set_name in SCHEDULED_SETS:
            while True:
                due = now - self.retry_grace if set_name == RETRY else now
                members = self.store.scheduled.take_due(set_name, self.bridge_id, due, self.BATCH)
                moved += self._enqueue(set_name, members, major)
                if len(members) < self.BATCH:
                    break
        return moved

    def _enqueue(self, set_name: str, members: list[bytes], major: int) -> int:
        moves, moved_jobs = [], []
        for raw in members:
            try:
                job = Job.parse(raw)
                enqueued = job.replace({"enqueued_at": timestamp(major)})
            except InvalidJob as exc:
                self._bury(set_name, raw, exc.reason)
                continue
            except (ValueError, RecursionError) as exc:
                # Whatever else one member breaks must not hold back the batch (or every later
                # poll, which would take the same members again): that member is poison.
                self._bury(set_name, raw, type(exc).__name__)
                continue
            moves.append((job.queue, enqueued.text, raw))
            moved_jobs.append(enqueued)
        if moves:
            self.store.scheduled.enqueue_moved(set_name, self.bridge_id, moves)
            self.history.enqueued(moved_jobs)
            self.metrics.scheduler_moved.labels(set_name).inc(len(moves))
        return len(moves)

    def _bury(self, set_name: str, raw: bytes, reason: str) -> None:
        self.store.scheduled.bury_moved(set_name, self.bridge_id, raw, poison_entry(raw, reason))
        self.history.invalid(raw, set_name)
        self.metrics.poison.labels(set_name, reason).inc()
        log.warning(
            "not a job in the %s set: moved to the dead set (%s)",
            set_name,
            reason,
            extra={"queue": set_name, "reason": reason, "bytes": len(raw)},
        )
