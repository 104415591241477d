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

from gokiq_celery.sidekiq.job import InvalidJob, Job, timestamp
from gokiq_celery.sidekiq.store import SCHEDULED_SETS, SidekiqStore
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
        sidekiq_version: int = 7,
        poll_interval: float = 0.25,
    ) -> None:
        self.store = store
        self.bridge_id = bridge_id
        self.metrics = metrics
        self.sidekiq_version = sidekiq_version
        self.poll_interval = poll_interval

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; Redis errors are logged and retried with a backoff."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                self.move_due()
            except Exception:
                delay = backoff.next()
                log.exception("scheduler: cannot move due jobs, retrying in %.1fs", delay)
                stop.wait(delay)
                continue
            backoff.reset()
            stop.wait(self.poll_interval)

    def move_due(self, now: float | None = None) -> int:
        """Move every job due at `now` (default: the current time); returns how many moved."""
        now = time.time() if now is None else now
        moved = 0
        for set_name in SCHEDULED_SETS:
            while True:
                members = self.store.take_due(set_name, self.bridge_id, now, self.BATCH)
                moved += self._enqueue(set_name, members)
                if len(members) < self.BATCH:
                    break
        return moved

    def _enqueue(self, set_name: str, members: list[bytes]) -> int:
        moves, moved_jobs = [], []
        for raw in members:
            try:
                job = Job.parse(raw)
            except InvalidJob as exc:
                self._bury(set_name, raw, exc.reason)
                continue
            enqueued = job.replace({"enqueued_at": timestamp(self.sidekiq_version)})
            moves.append((job.queue, enqueued.text, raw))
            moved_jobs.append(enqueued)
        if moves:
            self.store.enqueue_moved(set_name, self.bridge_id, moves)
            self.history.enqueued(moved_jobs)
            self.metrics.scheduler_moved.labels(set_name).inc(len(moves))
        return len(moves)

    def _bury(self, set_name: str, raw: bytes, reason: str) -> None:
        self.store.bury_moved(set_name, self.bridge_id, raw)
        self.history.invalid(raw, set_name)
        self.metrics.poison.labels(set_name, reason).inc()
        log.warning(
            "not a job in the %s set: moved to the dead set (%s)",
            set_name,
            reason,
            extra={"queue": set_name, "reason": reason, "bytes": len(raw)},
        )
