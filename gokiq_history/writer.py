"""A bounded buffer that callers fill and a thread of this process writes to the database: the
history recorder's and the ingestion API's audit's, each giving only its write and its delete.

A caller only appends to a list under a lock. The thread (started on the first `add`, again
after a fork) writes the buffer every `interval` as one batch (back to back while a batch takes
longer than that to write); a batch the database refuses
is put back and written again `RETRY_DELAY` later, and what is beyond `limit` is dropped,
counted and logged through `DropLog`. Callers never wait on the database; one may wait for
`has_room` first (the ingestion API's bulks, for their audit, on the event loop).

The same thread deletes the expired rows every `RETENTION_INTERVAL`, `RETENTION_BATCH` rows a
transaction and at most `RETENTION_BATCHES` transactions between two writes: a backlog (a
first start on an old table, more rows a minute than a round deletes) is worked through a
round per interval, never holding the writes back long.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .drops import DropLog

Item = TypeVar("Item")


class BufferedWriter(Generic[Item]):
    CLOSE_TIMEOUT = 10.0  # how long a clean shutdown waits for the batch being written
    RETRY_DELAY = 1.0  # after a failed write: the database is not hammered while it is down
    RETENTION_INTERVAL = 60.0
    RETENTION_BATCH = 1000
    RETENTION_BATCHES = 10

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        limit: int,
        *,
        write: Callable[[list[Item]], None],  # raises if the database did not take the batch
        delete_expired: Callable[[int], int],  # deletes up to n expired rows; how many went
        interval: float,
        count_drops: Callable[[int], None] | None = None,
        extra: Callable[[], list[Item]] | None = None,  # more for this batch, not buffered
        on_start: Callable[[], None] | None = None,  # a new process: forget the parent's state
        background: bool = True,  # False: no thread, the caller flushes (tests, benchmarks)
    ) -> None:
        self.name, self.log, self.limit, self.interval = name, log, limit, interval
        self.background = background
        self._write, self._delete_expired, self._extra = write, delete_expired, extra
        self._on_start = on_start
        self.drops = DropLog(log, name, limit, count_drops)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._writing = True  # the last batch was written (False: the database refused it)
        self._items: list[Item] = []
        self._pid: int | None = None
        self._stop = threading.Event()
        self._next_retention = 0.0

    def add(self, items: Sequence[Item]) -> None:
        """Buffer what fits; count the rest as dropped."""
        with self._lock:
            self._start()
            room = max(self.limit - len(self._items), 0)
            self._items.extend(items[:room])
            dropped = len(items) - min(room, len(items))
        self.drops.add(dropped)

    def start(self) -> None:
        """Start the thread in this process now (the history's runs: before their first item)."""
        with self._lock:
            self._start()

    def pending(self) -> int:
        with self._lock:
            return len(self._items)

    def _start(self) -> None:
        """Under the lock: the writer of this process (again after a fork, where the parent's
        thread does not carry over and its buffer is the parent's to write)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._items, self._stop = [], threading.Event()
        if self._on_start is not None:
            self._on_start()
        if self.background:
            name = f"gokiq-{self.name}"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid and not self._stop.is_set():
            started = time.monotonic()
            delay = self.interval if self.flush() else self.RETRY_DELAY
            self.retain()
            # A write every `interval`, not `interval` after each: at bulk rates, when a batch
            # takes as long to write as the interval, the next one starts at once.
            self._stop.wait(max(delay - (time.monotonic() - started), 0.0))

    def flush(self) -> bool:
        """Write what is buffered now; on an error put it back (within the bound). Returns
        whether the database took it."""
        with self._lock:
            batch, self._items = self._items, []
        if self._extra is not None:
            batch = self._extra() + batch
        if not batch:
            return True
        try:
            self._write(batch)
        except Exception as exc:
            self.log.warning(
                "%s: cannot write %d events yet: %s", self.name, len(batch), short(exc)
            )
            self._put_back(batch)
            self._writing = False
            return False
        self._writing = True
        return True

    def has_room(self, n: int) -> bool:
        """Whether `n` more items fit now, or no room is coming: the database refused the last
        batch (a caller that waits for room stops waiting). Against an empty buffer, yes: only
        `limit` of more than `limit` at once are kept."""
        with self._lock:
            return not self._writing or not self._items or len(self._items) + n <= self.limit

    def _put_back(self, batch: list[Item]) -> None:
        with self._lock:
            batch.extend(self._items)
            self._items = batch[: self.limit]
            dropped = len(batch) - len(self._items)
        self.drops.add(dropped)

    def retain(self) -> None:
        """A round of `delete_expired` when one is due (errors are logged: tried again later)."""
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + self.RETENTION_INTERVAL
        try:
            if self.delete_expired() == self.RETENTION_BATCH * self.RETENTION_BATCHES:
                self._next_retention = now  # more to delete: the next round after a write
        except Exception as exc:
            self.log.warning("%s: retention delete failed: %s", self.name, short(exc))

    def delete_expired(self) -> int:
        """Up to `RETENTION_BATCHES` deletes of `RETENTION_BATCH` expired rows; how many went."""
        deleted = 0
        for _ in range(self.RETENTION_BATCHES):
            count = self._delete_expired(self.RETENTION_BATCH)
            deleted += count
            if count < self.RETENTION_BATCH:
                break
        return deleted

    def close(self) -> None:
        """Stop the thread, once the batch it may be writing is written, and write what is
        left (a clean shutdown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.CLOSE_TIMEOUT)
        self.flush()


def short(exc: Exception) -> str:
    """The first line of a driver error (they carry the SQL and parameters after it)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
