"""Events dropped from a full buffer (the database slow or down): counted at once, logged at
most once per `INTERVAL`, so that a long outage gives one warning a minute, not one per event.
Used by the history recorder and the ingestion API's audit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class DropLog:
    INTERVAL = 60.0

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        limit: int,
        count: Callable[[int], None] | None = None,  # e.g. a Prometheus counter's `inc`
    ) -> None:
        self.log, self.what, self.limit, self._count = log, what, limit, count
        self.total = 0  # every drop since start
        self._since_log = 0
        self._next_log = 0.0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        if count <= 0:
            return
        if self._count is not None:
            self._count(count)
        now = time.monotonic()
        with self._lock:
            self.total += count
            self._since_log += count
            if now < self._next_log:
                return
            self._next_log = now + self.INTERVAL
            count, self._since_log = self._since_log, 0
        self.log.warning(
            "%s: %d events dropped (buffer of %d full: the database is slow or down)",
            self.what,
            count,
            self.limit,
        )
