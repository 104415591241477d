"""The job history's watch on jobs that wait in Redis: `scheduled` while in `schedule` (pushed
with perform_in/perform_at by any client: the Rails app's, gokiq's, a sidecar's job) and
`retrying` while in `retry`, each with its due time.

Every client writes those sets straight into Redis, so the bridge reads them; it never takes
anything out (the scheduler does that when a job is due). Each set is read with ZSCAN, a slice
every `INTERVAL`, sized from the set's size so that a whole pass takes about `PASS` seconds,
but never more than `MAX_SLICE` members a slice: Redis and the bridge spend O(slice) per tick
whatever the set's size, and a job shows as waiting within one pass (about `PASS` seconds; a
set of more than MAX_SLICE x PASS / INTERVAL members takes proportionally longer). A member
seen in this pass or the last one is not recorded again (by its bytes and score: a job moved
to another due time is); the history's merge keeps a later state (enqueued, running, ...) over
a waiting one whatever the order in which they are written.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from gokiq_celery.sidekiq.job import InvalidJob, Job
from gokiq_celery.sidekiq.keys import RETRY, SCHEDULE
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_history.recorder import HistoryRecorder

from .retrying import Backoff

log = logging.getLogger(__name__)

STATE_OF_SET = {SCHEDULE: "scheduled", RETRY: "retrying"}


class _Pass:
    """Where one set's ZSCAN iteration stands, and what it and the previous one saw."""

    def __init__(self) -> None:
        self.cursor = 0
        self.slice = 0
        self.seen: set[int] = set()
        self.seen_before: set[int] = set()

    def remembers(self, key: int) -> bool:
        return key in self.seen or key in self.seen_before


class WaitingJobsWatcher:
    INTERVAL = 1.0
    PASS = 5.0
    MIN_SLICE = 100
    MAX_SLICE = 5000
    # Members remembered per set: past it, a member is recorded again on each pass (an
    # idempotent upsert), which costs database writes but never memory beyond this bound.
    MEMORY = 1_000_000

    def __init__(
        self, store: SidekiqStore, history: HistoryRecorder, interval: float = INTERVAL
    ) -> None:
        self.store = store
        self.history = history
        self.interval = interval
        self._passes = {name: _Pass() for name in STATE_OF_SET}

    def run(self, stop: threading.Event) -> None:
        """Read a slice of each set every `interval` until `stop`; errors are logged and
        retried with a backoff (the jobs do not depend on this)."""
        backoff, delay = Backoff(first=1.0, cap=30.0), 0.0
        while not stop.wait(delay):
            delay = self._poll_or_back_off(backoff)

    def _poll_or_back_off(self, backoff: Backoff) -> float:
        """Poll once; how long to wait before the next."""
        try:
            self.poll()
        except Exception:
            delay = backoff.next()
            log.exception("history: cannot read the waiting jobs, retrying in %.0fs", delay)
            return delay
        backoff.reset()
        return self.interval

    def poll(self) -> int:
        """Read the next slice of each set; how many waiting jobs were recorded."""
        return sum(self._read_slice(name, state) for name, state in STATE_OF_SET.items())

    def complete_pass(self) -> int:
        """Read each set to the end of the current pass (tests, and a first look at start)."""
        recorded = self.poll()
        while any(p.cursor for p in self._passes.values()):
            recorded += self.poll()
        return recorded

    def _read_slice(self, set_name: str, state: str) -> int:
        current = self._passes[set_name]
        if current.cursor == 0:
            current.slice = self._slice_size(self.store.scheduled.size(set_name))
        seen_at = time.time()  # before the read: no later than what the members were seen in
        current.cursor, members = self.store.scheduled.scan(set_name, current.cursor, current.slice)
        waiting = []
        for raw, score in members:
            key = hash((raw, score))
            known = current.remembers(key)
            if len(current.seen) < self.MEMORY:
                current.seen.add(key)
            if known:
                continue
            try:
                waiting.append((Job.parse(raw), score))
            except (InvalidJob, ValueError, RecursionError):
                continue  # the scheduler buries it when it is due
        if current.cursor == 0:  # the pass is complete: what it did not see has left the set
            current.seen_before, current.seen = current.seen, set()
        if waiting:
            self.history.waiting(state, waiting, seen_at)
        return len(waiting)

    def _slice_size(self, size: int) -> int:
        wanted = math.ceil(size * self.interval / self.PASS)
        return max(self.MIN_SLICE, min(self.MAX_SLICE, wanted))
