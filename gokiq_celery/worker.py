"""The Worker: what one Celery worker process does with a `gokiq.perform` delivery.

It claims the delivery in the ledger, runs the job in the sidecar, stores the job's fate as
Sidekiq would (done, retry set, dead set, put back) and settles the delivery. A failure's fate
is Sidekiq's (`RetryPolicy`); the task (tasks.py) turns it into Celery's retry or failure.

One Worker per process, built when the Celery worker starts (the `worker_init` signal, in the
main process: a prefork pool's children inherit it, and their settlers restart after the
fork), and reached with `current_worker()`. Tests build their own and `install_worker` it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NoReturn

from gokiq_history.recorder import NULL_RECORDER, Recorder, open_recorder

from .metrics import RESOLVED_STATUSES, WorkerMetrics, process_metrics, queue_label
from .settings import Settings, process_settings
from .settler import DeliverySettler
from .sidecar import Execution, SidecarClient, SidecarDied, SidecarUnavailable
from .sidekiq.job import InvalidJob, Job, poison_entry
from .sidekiq.retry import Decision, Failure, Outcome, RetryPolicy
from .sidekiq.store import SidekiqStore
from .sidekiq.version import SidekiqVersionResolver, SidekiqVersionUnknown

log = logging.getLogger("gokiq.worker")

# What a run adds to Sidekiq's stat:processed and stat:failed, by outcome, written in the
# transaction that settles its delivery (a retry's when it is re-published: PerformTask.retry).
# The other outcomes (unavailable, duplicate, invalid, stale) ran no job.
RUN_COUNTS = {
    Outcome.OK: (1, 0),
    **dict.fromkeys((Outcome.PARKED, Outcome.DEAD, Outcome.DROPPED, Outcome.DISCARDED), (1, 1)),
}
# Outcomes that leave the job's fate unknown: a 409 means another run of the jid is still in the
# sidecar (e.g. one whose answer timed out), and it may yet fail with nobody to hear it. Their
# ledger entry is not settled, so the bridge publishes the job again once the claim's deadline
# (`run_window`) has passed.
UNSETTLED = frozenset({Outcome.DUPLICATE})
# A job the sidecar died running this many times (exit!, OOM: a connection broken after the job
# was sent) fails with Gokiq::SidecarDied instead of going back to its queue again.
SIDECAR_DEATHS_MAX = 3


# What a payload's values can raise in gokiq's own handling (never Redis or broker errors, which
# must propagate: the delivery ledger publishes the job again).
UNHANDLED_PAYLOAD_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError, RecursionError)


class JobFailed(Exception):
    """The job raised and Sidekiq would retry it soon: Celery's autoretry re-sends it."""

    def __init__(self, decision: Decision, failure: Failure) -> None:
        super().__init__(f"{failure.error_class}: {failure.error_message}"[:500])
        self.decision = decision


class JobEnded(Exception):
    """The job failed for good (dead set, dropped, discarded, not a job), its fate stored and its
    delivery settled: the task fails, so Flower shows it as FAILURE with the error. Celery acks a
    failed task like any other."""

    def __init__(self, outcome: Outcome, error: str) -> None:
        super().__init__(f"{outcome}: {error}"[:500])
        self.outcome, self.error = outcome, error

    def __reduce__(self):  # Celery pickles a task's exception (for its events and backend)
        return type(self), (self.outcome, self.error)


class JobParked(Exception):
    """A retry parked in Sidekiq's `retry` set, delivery settled: the task ends as a Celery
    retry (RETRY in Flower, a task-retried event) although the bridge, not Celery, re-sends it."""

    outcome = Outcome.PARKED

    def __init__(self, error: str, delay: float) -> None:
        super().__init__(error[:500])
        self.error, self.delay = error, delay

    def __reduce__(self):
        return type(self), (self.error, self.delay)


def _error(failure: Failure) -> str:
    return f"{failure.error_class}: {failure.error_message}"


@dataclass
class Worker:
    """What a worker process needs to run jobs, built once per process (after a fork)."""

    settings: Settings
    store: SidekiqStore
    sidecar: SidecarClient
    policy: RetryPolicy
    settler: DeliverySettler = field(init=False)
    served_queues: frozenset[str] = field(init=False)
    history: Recorder = NULL_RECORDER  # the job history (gokiq_history)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)  # own registry unless given

    def __post_init__(self) -> None:
        self.settler = DeliverySettler(self.store)
        # The Sidekiq queues gokiq hands over: a worker consumes their Celery queues.
        self.served_queues = frozenset(spec.name for spec in self.settings.queues)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: WorkerMetrics | None = None) -> Worker:
        metrics = metrics or WorkerMetrics()
        store = SidekiqStore.from_settings(settings)
        versions = store.versions(settings.sidekiq_version)
        return cls(
            settings,
            store,
            SidecarClient(settings, store.redis, metrics),
            RetryPolicy(settings.max_retries, versions),
            history=open_recorder(settings, metrics.registry),  # served with the worker's
            metrics=metrics,
        )

    @property
    def versions(self) -> SidekiqVersionResolver:
        """The app's Sidekiq version, as this process learns it (one resolver: the policy's)."""
        return self.policy.versions

    def perform(
        self, payload: str, queue: str, delivery: str | None = None, retry_set: bool = False
    ) -> Outcome:
        """Run one delivery of a job; return its outcome, or raise `JobFailed` for a Celery retry,
        `JobParked` for a retry parked in the retry set, `JobEnded` for a job that failed for good.

        `delivery` is the message's token in the delivery ledger (None: published without one,
        run untracked). The token is settled (in the next batch of `DeliverySettler`) once the
        job's fate is stored; if this process dies first, a bridge publishes the job again
        once the process has been silent for WORKER_TTL (the claim names it). `retry_set`: a
        countdown retry, whose token enters the ledger only if it claims the job's entry in the
        retry set (`payload`, exact bytes) before anyone else does.
        """
        deadline = time.time() + self.settings.run_window
        self.settler.start()
        if delivery and not self._claim(payload, queue, delivery, deadline, retry_set):
            log.info(
                "stale message skipped: its job was settled or published again",
                extra={"queue": queue, "delivery": delivery},
            )
            return Outcome.STALE
        try:
            outcome = self._perform(payload, queue)
        except (JobEnded, JobParked) as ended:
            self._settle(delivery, ended.outcome)
            raise
        if outcome not in UNSETTLED:
            self._settle(delivery, outcome)
        return outcome

    def _claim(
        self, payload: str, queue: str, delivery: str, deadline: float, retry_set: bool
    ) -> bool:
        holder = self.settler.holder
        if retry_set:
            return self.store.ledger.claim_retry(payload, delivery, queue, deadline, holder)
        return self.store.ledger.claim(delivery, deadline, holder)

    def _settle(self, delivery: str | None, outcome: Outcome) -> None:
        processed, failed = RUN_COUNTS.get(outcome, (0, 0))
        if delivery or processed:
            self.settler.settle(delivery, processed, failed)

    def _perform(self, payload: str, queue: str) -> Outcome:
        started = time.monotonic()
        try:
            job = Job.parse(payload)
        except InvalidJob as exc:
            self.store.dead.add(poison_entry(payload, exc.reason))
            self.history.invalid(payload, queue)
            log.error(
                "invalid job payload sent to the dead set: %s", exc.reason, extra={"queue": queue}
            )
            self.metrics.jobs.labels(self._queue_label(queue), "(invalid)", Outcome.INVALID).inc()
            raise JobEnded(Outcome.INVALID, exc.reason) from None
        outcome = Outcome.RETRY
        self.history.started(job, queue)
        try:
            outcome = self._run(job, queue)
            return outcome
        except (JobEnded, JobParked) as ended:
            outcome = ended.outcome
            raise
        finally:
            self.history.finished(job, outcome)
            labels = self._queue_label(queue), self.metrics.class_labels.label(job), outcome
            self.metrics.jobs.labels(*labels).inc()
            self.metrics.duration.observe(time.monotonic() - started)

    def _queue_label(self, queue: str) -> str:
        return queue_label(queue, (spec.name for spec in self.settings.queues))

    def _run(self, job: Job, queue: str) -> Outcome:
        if log.isEnabledFor(logging.INFO):
            log.info("start", extra=job.log_context(queue))
        try:
            execution = self.sidecar.execute(job, queue)
        except SidecarUnavailable as exc:
            killer = self._killed_sidecar(job, exc)
            if killer is None:
                return self._put_back(job, queue, exc)
            execution = killer
        if execution.status in RESOLVED_STATUSES:
            self.metrics.class_labels.learn(job)
        try:
            return self._handle_result(job, queue, execution)
        except UNHANDLED_PAYLOAD_ERRORS as exc:
            # The job ran, but something in its payload breaks what follows. Raising it would
            # leave its delivery unsettled and the job re-published (and run) forever: bury it.
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.store.dead.add(poison_entry(job.text, error))
            log.error(
                "job ran, but its payload broke its retry handling: sent to the dead set",
                extra=job.log_context(queue),
            )
            raise JobEnded(Outcome.DEAD, error) from None

    def _put_back(self, job: Job, queue: str, reason: Exception) -> Outcome:
        # Not the job's fault: back to the tail of its queue (it runs next), no retry spent.
        self.store.queues.requeue(queue, job.text)
        log.warning(
            "sidecar unavailable, job put back on its queue: %s",
            reason,
            extra=job.log_context(queue),
        )
        return Outcome.UNAVAILABLE

    def _killed_sidecar(self, job: Job, exc: SidecarUnavailable) -> Execution | None:
        """The failure of a job the sidecar died running SIDECAR_DEATHS_MAX times, else None.

        Every job in flight when the sidecar dies gets a death on its count; only one that kills
        it each time it runs reaches the limit (the count lives SIDECAR_DEATHS_TTL)."""
        if not isinstance(exc, SidecarDied) or not job.jid:
            return None
        deaths = self.store.sidecar_deaths.count(job.jid)
        if deaths < SIDECAR_DEATHS_MAX:
            return None
        message = f"the sidecar died {deaths} times while running this job (exit!, out of memory?)"
        return Execution("failed", failure=Failure("Gokiq::SidecarDied", message))

    def _handle_result(self, job: Job, queue: str, execution: Execution) -> Outcome:
        if execution.status == "duplicate":
            log.info(
                "job already running in the sidecar, this delivery dropped",
                extra=job.log_context(queue),
            )
            return Outcome.DUPLICATE
        if execution.succeeded:
            if log.isEnabledFor(logging.INFO):
                extra = {**job.log_context(queue), "elapsed": execution.execution_time}
                log.info("done", extra=extra)
            return Outcome.OK
        failure = execution.failure
        try:
            decision = self.policy.decide(job, failure, queue)
        except SidekiqVersionUnknown as exc:  # a retry written now could have the wrong format
            return self._put_back(job, queue, exc)
        retry_at = time.time() + decision.delay if decision.outcome is Outcome.RETRY else None
        self.history.failed(job, failure.error_class, failure.error_message, retry_at)
        log.info(
            "fail: %s: %s",
            failure.error_class,
            failure.error_message[:200],
            extra={
                **job.log_context(queue),
                "elapsed": execution.execution_time,
                "outcome": decision.outcome,
            },
        )
        return self._carry_out(job, queue, failure, decision)

    def _carry_out(self, job: Job, queue: str, failure: Failure, decision: Decision) -> NoReturn:
        outcome = decision.outcome
        if outcome is Outcome.RETRY:
            # A retry_queue no worker consumes would hold a Celery retry for ever: the retry
            # set instead, whence the bridge moves it to that Sidekiq queue when due.
            short = decision.delay <= self.settings.max_celery_countdown
            if short and decision.job.queue in self.served_queues:
                raise JobFailed(decision, failure)
            self.park(decision)
            raise JobParked(_error(failure), decision.delay)
        if outcome is Outcome.DEAD:
            self._bury(decision, failure)
            raise JobEnded(Outcome.DEAD, _error(failure))
        if decision.death_handlers:
            # `retry: false` (and 8.0.7+'s :discard) still runs the app's death handlers.
            self._exhausted_hooks(decision.job, failure, run_hook=False, death_handlers=True)
        raise JobEnded(outcome, _error(failure))

    def park(self, decision: Decision) -> None:
        """Hold a retry in Sidekiq's `retry` set; the bridge re-enqueues it when due."""
        self.store.scheduled.schedule_retry(decision.job, time.time() + decision.delay)
        log.info(
            "retry parked in the retry set for %.0fs",
            decision.delay,
            extra=decision.job.log_context(),
        )

    def _bury(self, decision: Decision, failure: Failure) -> None:
        """Sidekiq's order: the class's exhausted hook, the dead set, then the death handlers."""
        job = decision.job
        discard = self._exhausted_hooks(job, failure, run_hook=True, death_handlers=False)
        if decision.goes_to_dead_set and not discard:
            self.store.dead.add(job.text)
            log.warning(
                "Adding dead %s job %s",
                job.display_class,
                job.jid,
                extra=job.log_context(),
            )
        else:
            job = self.policy.unburied(job)
        self._exhausted_hooks(job, failure, run_hook=False, death_handlers=True, discarded=discard)

    def _exhausted_hooks(
        self,
        job: Job,
        failure: Failure,
        *,
        run_hook: bool,
        death_handlers: bool,
        discarded: bool = False,
    ) -> bool:
        try:
            return self.sidecar.exhausted(
                job, failure, run_hook=run_hook, death_handlers=death_handlers, discarded=discarded
            )
        except SidecarUnavailable as exc:
            # The job is still kept (dead set or as its retry field says); only the hook is lost.
            log.error(
                "sidecar unavailable: retries-exhausted hook or death handlers not run: %s",
                exc,
                extra=job.log_context(),
            )
            return False


# This process's Worker (see the module docstring).
_current: Worker | None = None


def current_worker() -> Worker:
    """This process's Worker. Raises RuntimeError outside a started gokiq worker."""
    if _current is None:
        raise RuntimeError("no gokiq Worker here: a Celery worker builds one as it starts")
    return _current


def install_worker(worker: Worker | None) -> Worker | None:
    """Make `worker` this process's Worker (None: none); returns the one it replaces."""
    global _current
    previous, _current = _current, worker
    return previous


def start_worker_process() -> Worker:
    """The Celery worker starts: build this process's Worker from its settings, unless one was
    installed already (a test's)."""
    if _current is None:
        install_worker(Worker.from_settings(process_settings(), process_metrics()))
    return current_worker()


def stop_worker_process() -> None:
    """A clean shutdown: write what the settler holds and leave the ledger's workers; close the
    history."""
    if _current is not None:
        _current.settler.leave()
        _current.history.close()
