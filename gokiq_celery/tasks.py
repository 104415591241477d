"""The one task, `gokiq.perform`: run a Sidekiq job in the sidecar, then ack, retry, park or bury.

A failure's fate is Sidekiq's (`RetryPolicy`); Celery carries it out. Every pending retry waits
in Sidekiq's `retry` set (the Web UI's Retries tab, Retry Now, Delete, Kill). A short one is
also Celery's own (`autoretry_for` on `JobFailed`, countdown and `max_retries` from the job's
`retry` field): its countdown is a timer that claims the entry from the set when it fires, and
runs the job only if it was still there. A retry due later than `max_celery_countdown` (a
broker cannot hold an unacked message for days), or whose countdown is late, is taken by the
bridge's poller.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_process_shutdown, worker_shutdown

from gokiq_history.recorder import NULL_RECORDER, Recorder, open_recorder

from . import metrics
from .celery_app import app
from .messages import TASK_NAME, new_delivery_token, retry_publish_options
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
RUN_COUNTS = {"ok": (1, 0), **dict.fromkeys(("parked", "dead", "dropped", "discarded"), (1, 1))}
# Outcomes that leave the job's fate unknown: a 409 means another run of the jid is still in the
# sidecar (e.g. one whose answer timed out), and it may yet fail with nobody to hear it. Their
# ledger entry is not settled, so the bridge publishes the job again once the claim's deadline
# (`run_window`) has passed.
UNSETTLED = frozenset({"duplicate"})
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

    def __init__(self, outcome: str, error: str) -> None:
        super().__init__(f"{outcome}: {error}"[:500])
        self.outcome, self.error = outcome, error

    def __reduce__(self):  # Celery pickles a task's exception (for its events and backend)
        return type(self), (self.outcome, self.error)


class JobParked(Exception):
    """A retry parked in Sidekiq's `retry` set, delivery settled: the task ends as a Celery
    retry (RETRY in Flower, a task-retried event) although the bridge, not Celery, re-sends it."""

    outcome = "parked"

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

    def __post_init__(self) -> None:
        self.settler = DeliverySettler(self.store)
        # The Sidekiq queues gokiq hands over: a worker consumes their Celery queues.
        self.served_queues = frozenset(spec.name for spec in self.settings.queues)

    @classmethod
    def from_settings(cls, settings: Settings) -> Worker:
        store = SidekiqStore.from_settings(settings)
        versions = SidekiqVersionResolver(settings.sidekiq_version, store.published_sidekiq_version)
        return cls(
            settings,
            store,
            SidecarClient(settings, store.redis),
            RetryPolicy(settings.max_retries, versions),
            history=open_recorder(settings),
        )

    @property
    def versions(self) -> SidekiqVersionResolver:
        """The app's Sidekiq version, as this process learns it (one resolver: the policy's)."""
        return self.policy.versions

    def perform(
        self, payload: str, queue: str, delivery: str | None = None, retry_set: bool = False
    ) -> str:
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
            return "stale"
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
            return self.store.claim_retry(payload, delivery, queue, deadline, holder)
        return self.store.claim_delivery(delivery, deadline, holder)

    def _settle(self, delivery: str | None, outcome: str) -> None:
        processed, failed = RUN_COUNTS.get(outcome, (0, 0))
        if delivery or processed:
            self.settler.settle(delivery, processed, failed)

    def _perform(self, payload: str, queue: str) -> str:
        started = time.monotonic()
        try:
            job = Job.parse(payload)
        except InvalidJob as exc:
            self.store.add_dead(poison_entry(payload, exc.reason))
            self.history.invalid(payload, queue)
            log.error(
                "invalid job payload sent to the dead set: %s", exc.reason, extra={"queue": queue}
            )
            metrics.JOBS.labels(self._queue_label(queue), "(invalid)", "invalid").inc()
            raise JobEnded("invalid", exc.reason) from None
        outcome = "retry"
        self.history.started(job, queue)
        try:
            outcome = self._run(job, queue)
            return outcome
        except (JobEnded, JobParked) as ended:
            outcome = ended.outcome
            raise
        finally:
            self.history.finished(job, outcome)
            labels = self._queue_label(queue), metrics.CLASS_LABELS.label(job), outcome
            metrics.JOBS.labels(*labels).inc()
            metrics.DURATION.observe(time.monotonic() - started)

    def _queue_label(self, queue: str) -> str:
        return metrics.queue_label(queue, (spec.name for spec in self.settings.queues))

    def _run(self, job: Job, queue: str) -> str:
        if log.isEnabledFor(logging.INFO):
            log.info("start", extra=job.log_context(queue))
        try:
            execution = self.sidecar.execute(job, queue)
        except SidecarUnavailable as exc:
            killer = self._killed_sidecar(job, exc)
            if killer is None:
                return self._put_back(job, queue, exc)
            execution = killer
        if execution.status in metrics.RESOLVED_STATUSES:
            metrics.CLASS_LABELS.learn(job)
        try:
            return self._handle_result(job, queue, execution)
        except UNHANDLED_PAYLOAD_ERRORS as exc:
            # The job ran, but something in its payload breaks what follows. Raising it would
            # leave its delivery unsettled and the job re-published (and run) forever: bury it.
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.store.add_dead(poison_entry(job.text, error))
            log.error(
                "job ran, but its payload broke its retry handling: sent to the dead set",
                extra=job.log_context(queue),
            )
            raise JobEnded("dead", error) from None

    def _put_back(self, job: Job, queue: str, reason: Exception) -> str:
        # Not the job's fault: back to the tail of its queue (it runs next), no retry spent.
        self.store.requeue(queue, job.text)
        log.warning(
            "sidecar unavailable, job put back on its queue: %s",
            reason,
            extra=job.log_context(queue),
        )
        return "unavailable"

    def _killed_sidecar(self, job: Job, exc: SidecarUnavailable) -> Execution | None:
        """The failure of a job the sidecar died running SIDECAR_DEATHS_MAX times, else None.

        Every job in flight when the sidecar dies gets a death on its count; only one that kills
        it each time it runs reaches the limit (the count lives SIDECAR_DEATHS_TTL)."""
        if not isinstance(exc, SidecarDied) or not job.jid:
            return None
        deaths = self.store.count_sidecar_death(job.jid)
        if deaths < SIDECAR_DEATHS_MAX:
            return None
        message = f"the sidecar died {deaths} times while running this job (exit!, out of memory?)"
        return Execution("failed", failure=Failure("Gokiq::SidecarDied", message))

    def _handle_result(self, job: Job, queue: str, execution: Execution) -> str:
        if execution.status == "duplicate":
            log.info(
                "job already running in the sidecar, this delivery dropped",
                extra=job.log_context(queue),
            )
            return "duplicate"
        if execution.succeeded:
            if log.isEnabledFor(logging.INFO):
                extra = {**job.log_context(queue), "elapsed": execution.execution_time}
                log.info("done", extra=extra)
            return "ok"
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
                "outcome": decision.outcome.value,
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
            raise JobEnded("dead", _error(failure))
        if outcome is Outcome.DROP or self.versions.require().major >= 8:
            # `retry: false` (and 8.x's :discard) still runs the app's death handlers.
            self._exhausted_hooks(decision.job, failure, run_hook=False, death_handlers=True)
        raise JobEnded("dropped" if outcome is Outcome.DROP else "discarded", _error(failure))

    def park(self, decision: Decision) -> None:
        """Hold a retry in Sidekiq's `retry` set; the bridge re-enqueues it when due."""
        self.store.schedule_retry(decision.job, time.time() + decision.delay)
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
            self.store.add_dead(job.text)
            log.warning(
                "Adding dead %s job %s",
                job.display_class,
                job.jid,
                extra=job.log_context(),
            )
        self._exhausted_hooks(job, failure, run_hook=False, death_handlers=True)

    def _exhausted_hooks(
        self, job: Job, failure: Failure, *, run_hook: bool, death_handlers: bool
    ) -> bool:
        try:
            return self.sidecar.exhausted(
                job, failure, run_hook=run_hook, death_handlers=death_handlers
            )
        except SidecarUnavailable as exc:
            # The job is still kept (dead set or as its retry field says); only the hook is lost.
            log.error(
                "sidecar unavailable: retries-exhausted hook or death handlers not run: %s",
                exc,
                extra=job.log_context(),
            )
            return False


class PerformTask(Task):
    """Celery's retry machinery, driven by Sidekiq's count: `request.retries` = failures so far."""

    autoretry_for = (JobFailed,)
    throws = (JobEnded,)  # an expected failure: logged in one line, no traceback
    retry_backoff = False  # the delay is Sidekiq's curve (count⁴ + 15 + jitter), set per retry
    retry_jitter = False
    acks_late = True
    typing = False

    @cached_property
    def worker(self) -> Worker:
        return Worker.from_settings(process_settings())

    def retry(
        self,
        args=None,
        kwargs=None,
        exc=None,
        throw=True,
        eta=None,
        countdown=None,
        max_retries=None,
        **options: Any,
    ):
        if not isinstance(exc, JobFailed):
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        decision = exc.decision
        queue = decision.job.queue  # `retry_queue` when the job has one, as Sidekiq moves it
        settings, store = self.worker.settings, self.worker.store
        delivery = new_delivery_token()  # enters the ledger when its countdown claims the retry
        store.fail_into_retry_set(
            self.request.kwargs.get("delivery"), decision.job, time.time() + decision.delay
        )
        # Sidekiq's retry_count is the truth (it survives parking and "Retry now"); make Celery
        # count from it so its max_retries check agrees with Sidekiq's.
        self.request.retries = decision.job.get("retry_count")
        try:
            return super().retry(
                args=(decision.job.text, queue),
                kwargs={"delivery": delivery, "retry_set": True},
                exc=exc,
                throw=throw,
                countdown=decision.delay,
                # Always explicit: Celery 5.7 keeps a per-call override on the shared task object.
                max_retries=decision.limit,
                queue=settings.celery_queue(queue),
                # A run of its own (`<jid>.<n>`, so this one stays RETRY in Flower), shown under
                # the job's class like the bridge's messages.
                **retry_publish_options(decision.job, queue),
            )
        except Reject:
            # Re-publishing failed (broker down): the retry waits in Sidekiq's retry set
            # already, and the bridge's poller takes it when due.
            log.info(
                "retry left to the bridge: its countdown could not be published",
                extra=decision.job.log_context(),
            )
            return Ignore()


# Not shared: other Celery apps in the same process (the bridge's, tests') must not inherit it.
@app.task(bind=True, base=PerformTask, name=TASK_NAME, shared=False)
def perform(
    self: PerformTask,
    payload: str,
    queue: str,
    delivery: str | None = None,
    retry_set: bool = False,
) -> str:
    try:
        return self.worker.perform(payload, queue, delivery, retry_set)
    except JobParked as parked:  # acked like any retry: the job waits in Sidekiq's retry set
        raise Retry(exc=parked, when=parked.delay) from None


@worker_shutdown.connect  # the threads pool (and solo) run jobs in the main process
@worker_process_shutdown.connect  # prefork: each child has its own settler
def _flush_settlements(**_kwargs) -> None:
    worker = perform.__dict__.get("worker")  # built on a process's first job, if any
    if worker is not None:
        worker.settler.leave()
        worker.history.close()
