"""DeliverySettler: settles finished deliveries and counts their runs, in batches, off the jobs'
threads.

By the time a job gets here its fate is stored (done, dead set, retry set); what is left is
removing its delivery-ledger entry and adding to Sidekiq's `stat:processed` / `stat:failed`.
Doing that per job, on the job's thread, was a Redis round trip (five GIL-releasing syscalls)
for every job. Here the jobs of the last `interval` go in one transaction from a background
thread, the way Sidekiq's own processors keep their counts in memory for the heartbeat to flush.

What that costs: a worker process SIGKILLed before a flush leaves the entries of jobs that
finished in the last `interval` in the ledger, so those jobs run again once their deadline
passes (at-least-once, as for the jobs that were running), and their stats are not counted.
A clean shutdown flushes (`worker_shutdown`, `worker_process_shutdown`).

The same thread keeps this process's sign of life in the ledger (`beat_worker`) between its
claims, so that a bridge hands its deliveries back within seconds of its death.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from .sidekiq.ledger import WORKER_BEAT
from .sidekiq.store import SidekiqStore

log = logging.getLogger(__name__)


class DeliverySettler:
    INTERVAL = 0.05

    def __init__(self, store: SidekiqStore, interval: float = INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._lock = threading.Lock()
        self._tokens: list[str] = []
        self._counts = [0, 0]  # processed, failed
        self._pid: int | None = None  # the process whose flusher thread is running
        self.holder = ""  # this process, as the ledger names the claimer of a delivery
        self._next_beat = 0.0

    def start(self) -> None:
        """Start the thread in this process (again after a fork) before its first claim."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._start()

    def settle(self, token: str | None, processed: int = 0, failed: int = 0) -> None:
        """Queue a finished delivery (`token` None: an untracked message) and its counts."""
        with self._lock:
            if self._pid != os.getpid():
                self._start()
            if token:
                self._tokens.append(token)
            self._counts[0] += processed
            self._counts[1] += failed

    def flush(self) -> None:
        """Write what is queued now; on a Redis error keep it for the next flush."""
        with self._lock:
            tokens, (processed, failed) = self._tokens, self._counts
            self._tokens, self._counts = [], [0, 0]
        if not (tokens or processed or failed):
            return
        try:
            self.store.ledger.settle(tokens, processed=processed, failed=failed)
        except Exception as exc:  # Redis down: nothing is dropped, the next flush tries again
            with self._lock:
                self._tokens[:0] = tokens
                self._counts[0] += processed
                self._counts[1] += failed
            log.warning("could not settle %d deliveries yet: %s", len(tokens), exc)

    def _start(self) -> None:
        # Also after a fork: the parent's thread does not exist in the child, nor its queue.
        self._pid = os.getpid()
        self.holder = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
        self._tokens, self._counts = [], [0, 0]
        threading.Thread(target=self._run, name="gokiq-settler", daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.flush()
            self._beat()

    def _beat(self) -> None:
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + WORKER_BEAT
        try:
            self.store.ledger.beat_worker(self.holder)
        except Exception as exc:  # Redis away: the next beat tries again
            log.warning("could not beat in the delivery ledger: %s", exc)

    def leave(self) -> None:
        """A clean exit: flush, then no longer a worker whose deliveries may need handing back."""
        self.flush()
        if self._pid == os.getpid():
            self._pid = None  # the thread stops
            try:
                self.store.ledger.leave_workers(self.holder)
            except Exception as exc:
                log.warning("could not leave the delivery ledger: %s", exc)
