"""What the bridge and the workers record with: history events in a `BufferedWriter`.

A call on a job's path only builds its rows and appends them to a list under a lock; a thread
of the process (gokiq_history/writer.py) writes the buffer every `INTERVAL` as one transaction
of merged upserts. When the database is slow or down, the batch is kept and written again,
and events beyond `history_buffer` are dropped (counted in `gokiq_history_dropped_total`,
logged at most once a minute): the jobs never wait.

The same thread deletes the jobs not updated for `history_retention`, a few small batches at
a time.

With `history_url` empty, `open_recorder` returns `NULL_RECORDER`, whose calls do nothing,
and neither SQLAlchemy nor a thread is started.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from gokiq_celery.sidekiq.job import epoch_seconds

from .rows import (
    ERROR_MESSAGE_LIMIT,
    STATE_AFTER,
    attempt_event,
    fold,
    job_event,
    merge_attempt,
    merge_job,
)
from .writer import BufferedWriter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gokiq_celery.settings import Settings
    from gokiq_celery.sidekiq.job import Job

log = logging.getLogger("gokiq.history")

INVALID_CLASS = "(invalid)"  # the class shown for a payload that is not a job

# A buffered event: a row of gokiq_jobs (JOB) or of gokiq_job_attempts (RUN).
JOB, RUN = "job", "run"
Event = tuple[str, dict[str, Any]]


class NullRecorder:
    """History off: every call is a no-op."""

    enabled = False

    def enqueued(self, jobs: Any, queue: str | None = None) -> None:
        pass

    def waiting(self, state: str, jobs: list[tuple[Job, float]], seen_at: float) -> None:
        pass

    def started(self, job: Job, queue: str) -> None:
        pass

    def failed(
        self, job: Job, error_class: str, error_message: str, retry_at: float | None = None
    ) -> None:
        pass

    def finished(self, job: Job, outcome: str) -> None:
        pass

    def invalid(self, raw: bytes | str, queue: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL_RECORDER = NullRecorder()


def open_recorder(settings: Settings, registry: CollectorRegistry | None = None) -> Recorder:
    """This process's recorder: `NULL_RECORDER` unless `history_url` is set."""
    if not settings.history_url:
        return NULL_RECORDER
    return HistoryRecorder(settings, registry)


def invalid_jid(raw: bytes | str) -> str:
    """A stable id for a payload that has none: the same bytes always get the same row."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return "invalid-" + hashlib.sha256(data).hexdigest()[:24]


def attempt_number(job: Job) -> int:
    """Sidekiq's count of this run: 1, then retry_count + 2 (retry_count is 0 after a failure)."""
    count = job.get("retry_count")
    return count + 2 if isinstance(count, int) and not isinstance(count, bool) else 1


class _Run:
    """A run in progress on a worker thread."""

    __slots__ = (
        "attempt", "error_class", "error_message", "job", "monotonic", "queue", "reported",
        "retry_at", "started_at",
    )  # fmt: skip

    def __init__(self, job: Job, queue: str) -> None:
        self.job, self.queue, self.attempt = job, queue, attempt_number(job)
        self.started_at, self.monotonic = time.time(), time.monotonic()
        self.error_class: str | None = None
        self.error_message: str | None = None
        self.retry_at: float | None = None
        self.reported = False  # its "running" event was written


class HistoryRecorder:
    enabled = True
    INTERVAL = 0.2

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        background: bool = True,  # False: no thread, the caller flushes (tests, benchmarks)
    ) -> None:
        from .metrics import history_metrics

        self.url = settings.history_url
        self.record_args = settings.history_record_args
        self.retention = settings.history_retention
        self.migrate = settings.history_migrate
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = history_metrics(registry)
        # Runs in progress: a flush writes "running" for those still going. A job shorter than
        # the flush interval gets one job event and one run event, both when it ends.
        self._runs_lock = threading.Lock()
        self._running: dict[int, _Run] = {}
        self._engine = None
        self._frozen = False
        self._local = threading.local()  # the run in progress on each worker thread
        self.writer: BufferedWriter[Event] = BufferedWriter(
            "history",
            log,
            settings.history_buffer,
            write=self._write,
            delete_expired=self._delete_expired,
            interval=self.INTERVAL,
            count_drops=self.metrics.dropped.inc,
            extra=self._running_events,
            on_start=self._forget_runs,
            background=background,
        )
        self.drops = self.writer.drops

    # -- the calls on the jobs' path ------------------------------------------------------

    def enqueued(self, jobs: Any, queue: str | None = None) -> None:
        """Jobs put on (or fetched from) a queue."""
        now = time.time()
        self.writer.add([(JOB, self._enqueued_event(job, queue, now)) for job in jobs])

    def waiting(self, state: str, jobs: list[tuple[Job, float]], seen_at: float) -> None:
        """Jobs seen waiting in `schedule` ("scheduled") or `retry` ("retrying"), each with its
        due time, by a read that started at `seen_at` (bridge/waiting.py)."""
        events = [(JOB, self._waiting_event(job, state, due, seen_at)) for job, due in jobs]
        self.writer.add(events)

    def started(self, job: Job, queue: str) -> None:
        run = _Run(job, queue)
        self._local.run = run
        self.writer.start()
        with self._runs_lock:
            self._running[id(run)] = run

    def failed(
        self, job: Job, error_class: str, error_message: str, retry_at: float | None = None
    ) -> None:
        """The run in progress on this thread raised (and is retried at `retry_at`, if it is):
        kept for `finished`."""
        run = getattr(self._local, "run", None)
        if run is not None and run.job is job:
            run.error_class, run.error_message = error_class, error_message[:ERROR_MESSAGE_LIMIT]
            run.retry_at = retry_at

    def finished(self, job: Job, outcome: str) -> None:
        """The run started on this thread ended with `outcome` (gokiq_celery/worker.py)."""
        run = getattr(self._local, "run", None)
        self._local.run = None
        if run is None or run.job is not job:
            return
        with self._runs_lock:
            self._running.pop(id(run), None)
        now, runtime = time.time(), time.monotonic() - run.monotonic
        ended = {"finished_at": now, "outcome": outcome, "runtime": runtime}
        error = {"error_class": run.error_class, "error_message": run.error_message}
        events: list[Event] = []
        if state := STATE_AFTER.get(outcome):
            after = {"due_at": run.retry_at} if state == "retrying" else {"finished_at": now}
            failure = dict(error, error_at=now) if run.error_class else {}
            row = self._run_event(run, state, now, runtime=runtime, **after, **failure)
            events.append((JOB, row))
        events.append((RUN, self._attempt(run, **ended, **error)))
        self.writer.add(events)

    def invalid(self, raw: bytes | str, queue: str) -> None:
        """A payload that is not a job, sent to the dead set."""
        now = time.time()
        event = job_event(
            invalid_jid(raw),
            "dead",
            now,
            job_class=INVALID_CLASS,
            queue=queue,
            finished_at=now,
            error_class="InvalidJob",
            error_message="not a Sidekiq job payload",
            error_at=now,
        )
        self.writer.add([(JOB, event)])

    # -- building events --------------------------------------------------------------------

    def _enqueued_event(self, job: Job, queue: str | None, now: float) -> dict[str, Any]:
        enqueued_at = epoch_seconds(job.get("enqueued_at")) or now
        return self._job_event(
            job,
            queue or job.queue,
            "enqueued",
            now,
            attempt=attempt_number(job),
            enqueued_at=enqueued_at,
        )

    def _waiting_event(self, job: Job, state: str, due_at: float, seen_at: float) -> dict[str, Any]:
        """Dated when it was seen waiting, and never after it was due: before the same
        attempt's next state (enqueued, when due or moved by hand, then running...), whichever
        process records that one and whenever; a job seen again with a new due time is seen
        later, so its new due time wins."""
        values: dict[str, Any] = {"attempt": attempt_number(job), "due_at": due_at}
        if state == "retrying":  # about the run that failed; its error is in the payload
            values["attempt"] = values["attempts"] = values["attempt"] - 1
            values.update(_payload_error(job))
        return self._job_event(job, job.queue, state, min(seen_at, due_at), **values)

    def _job_event(self, job: Job, queue: str, state: str, at: float, **values: Any):
        args = json.dumps(job.args, ensure_ascii=False) if self.record_args else None
        return job_event(
            job.jid,
            state,
            at,
            job_class=job.display_class,
            queue=queue,
            args=args,
            created_at=epoch_seconds(job.get("created_at")),
            **values,
        )

    def _run_event(self, run: _Run, state: str, at: float, **values: Any) -> dict[str, Any]:
        return self._job_event(
            run.job,
            run.queue if state == "running" else run.job.queue,
            state,
            at,
            attempt=run.attempt,
            attempts=run.attempt,
            # As the bridge's `enqueued` has it: written after this, that one changes nothing.
            enqueued_at=epoch_seconds(run.job.get("enqueued_at")),
            first_started_at=run.started_at,
            last_started_at=run.started_at,
            worker=self.worker_name,
            **values,
        )

    def _attempt(self, run: _Run, **values: Any) -> dict[str, Any]:
        return attempt_event(
            run.job.jid, run.started_at, attempt=run.attempt, worker=self.worker_name, **values
        )

    def _running_events(self) -> list[Event]:
        """Events for the runs that started since the last flush and are still going."""
        with self._runs_lock:
            runs = [run for run in self._running.values() if not run.reported]
            for run in runs:
                run.reported = True
        events: list[Event] = [
            (JOB, self._run_event(run, "running", run.started_at)) for run in runs
        ]
        return events + [(RUN, self._attempt(run)) for run in runs]

    def _forget_runs(self) -> None:
        """A new process (a fork): the parent's runs are not this one's to report, nor its
        database connections this one's to use."""
        self._running, self._engine = {}, None

    # -- writing (on the writer's thread) ----------------------------------------------------

    def pending(self) -> int:
        return self.writer.pending()

    def flush(self) -> bool:
        """Write what is buffered now (see `BufferedWriter.flush`)."""
        return self.writer.flush()

    def _write(self, events: list[Event]) -> None:
        from . import store

        job_rows = fold([row for kind, row in events if kind == JOB], ("jid",), merge_job)
        attempt_rows = [row for kind, row in events if kind == RUN]
        attempt_rows = fold(attempt_rows, ("jid", "started_at"), merge_attempt)
        try:
            store.write_batch(self._ready_engine(), job_rows, attempt_rows)
        except Exception:
            self.metrics.write_errors.inc()
            raise
        self.metrics.written.inc(len(job_rows) + len(attempt_rows))
        if not self._frozen:
            self._freeze()

    def _freeze(self) -> None:
        """After the first write, move what the process holds now (SQLAlchemy, the driver, the
        compiled statements: all kept for the process's life) out of the collector's full passes:
        they made each one several times slower, a cost every job paid."""
        self._frozen = True
        gc.freeze()

    def _ready_engine(self):
        from . import store

        if self._engine is None:
            if self.migrate:
                from .migrations import upgrade

                upgrade(self.url)
            # No pre-ping (a round trip per batch): a batch that fails on a connection the
            # database dropped is put back and written again on a new one.
            self._engine = store.open_engine(self.url, pre_ping=False)
        return self._engine

    def _delete_expired(self, limit: int) -> int:
        from . import store

        cutoff = time.time() - self.retention
        deleted = store.delete_older_than(self._ready_engine(), cutoff, limit)
        self.metrics.deleted.inc(deleted)
        return deleted

    def delete_expired(self) -> int:
        """Delete jobs not updated for `history_retention`, in small batches; how many."""
        return self.writer.delete_expired()

    def close(self) -> None:
        """Write what is left (a clean shutdown) and stop the thread."""
        self.writer.close()
        if self._engine is not None:
            self._engine.dispose()


def _payload_error(job: Job) -> dict[str, Any]:
    """The last failure a retry's payload carries (Sidekiq's error_class, retried_at...)."""
    failed_at = epoch_seconds(job.get("retried_at")) or epoch_seconds(job.get("failed_at"))
    error_class, message = job.get("error_class"), job.get("error_message")
    if not (isinstance(error_class, str) and failed_at):
        return {}
    message = message[:ERROR_MESSAGE_LIMIT] if isinstance(message, str) else None
    return {"error_class": error_class, "error_message": message, "error_at": failed_at}


Recorder = NullRecorder | HistoryRecorder
