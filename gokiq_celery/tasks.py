"""The one task, `gokiq.perform`: run a Sidekiq job in the sidecar, then ack, retry, park or bury.

A failure's fate is Sidekiq's (`RetryPolicy`); Celery carries it out. A short retry is Celery's
own (`autoretry_for` on `JobFailed`, countdown and `max_retries` from the job's `retry` field).
A retry due later than `max_celery_countdown` is parked in Sidekiq's `retry` set, where the
bridge picks it up when due, because a broker cannot hold an unacked message for days.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_process_shutdown, worker_shutdown

from gokiq_history.recorder import NULL_RECORDER, Recorder, open_recorder

from . import metrics
from .celery_app import app
from .messages import TASK_NAME, argsrepr, new_delivery_token
from .settings import Settings, process_settings
from .settler import DeliverySettler
from .sidecar import Execution, SidecarClient, SidecarUnavailable
from .sidekiq.job import InvalidJob, Job
from .sidekiq.retry import Decision, Failure, Outcome, RetryPolicy
from .sidekiq.store import SidekiqStore

log = logging.getLogger("gokiq.worker")

# What a run adds to Sidekiq's stat:processed and stat:failed, by outcome, written in the
# transaction that settles its delivery (a retry's when it is re-published: PerformTask.retry).
# The other outcomes (unavailable, duplicate, invalid, stale) ran no job.
RUN_COUNTS = {"ok": (1, 0), **dict.fromkeys(("parked", "dead", "dropped", "discarded"), (1, 1))}


class JobFailed(Exception):
    """The job raised and Sidekiq would retry it soon: Celery's autoretry re-sends it."""

    def __init__(self, decision: Decision, failure: Failure) -> None:
        super().__init__(f"{failure.error_class}: {failure.error_message}"[:500])
        self.decision = decision


@dataclass
class Worker:
    """What a worker process needs to run jobs, built once per process (after a fork)."""

    settings: Settings
    store: SidekiqStore
    sidecar: SidecarClient
    policy: RetryPolicy
    settler: DeliverySettler = field(init=False)
    history: Recorder = NULL_RECORDER  # the job history (gokiq_history)

    def __post_init__(self) -> None:
        self.settler = DeliverySettler(self.store)

    @classmethod
    def from_settings(cls, settings: Settings) -> Worker:
        store = SidekiqStore.from_settings(settings)
        return cls(
            settings,
            store,
            SidecarClient(settings, store.redis),
            RetryPolicy(settings.max_retries, settings.sidekiq_version),
            history=open_recorder(settings),
        )

    def perform(self, payload: str, queue: str, delivery: str | None = None) -> str:
        """Run one delivery of a job; return its outcome, or raise `JobFailed` for a Celery retry.

        `delivery` is the message's token in the delivery ledger (None: published without one,
        run untracked). The token is settled (in the next batch of `DeliverySettler`) once the
        job's fate is stored; if this process dies first, the bridge publishes the job again
        when the token's deadline passes.
        """
        deadline = time.time() + self.settings.run_window
        if delivery and not self.store.claim_delivery(delivery, deadline):
            log.info(
                "stale message skipped: its job was settled or published again",
                extra={"queue": queue, "delivery": delivery},
            )
            return "stale"
        outcome = self._perform(payload, queue)
        processed, failed = RUN_COUNTS.get(outcome, (0, 0))
        if delivery or processed:
            self.settler.settle(delivery, processed, failed)
        return outcome

    def _perform(self, payload: str, queue: str) -> str:
        started = time.monotonic()
        try:
            job = Job.parse(payload)
        except InvalidJob as exc:
            self.store.add_dead(payload)
            self.history.invalid(payload, queue)
            log.error(
                "invalid job payload sent to the dead set: %s", exc.reason, extra={"queue": queue}
            )
            metrics.JOBS.labels(queue, "(invalid)", "invalid").inc()
            return "invalid"
        outcome = "retry"
        self.history.started(job, queue)
        try:
            outcome = self._run(job, queue)
            return outcome
        finally:
            self.history.finished(job, outcome)
            metrics.JOBS.labels(queue, job.display_class, outcome).inc()
            metrics.DURATION.observe(time.monotonic() - started)

    def _run(self, job: Job, queue: str) -> str:
        try:
            execution = self.sidecar.execute(job, queue)
        except SidecarUnavailable as exc:
            # Not the job's fault: back to the tail of its queue (it runs next), no retry spent.
            self.store.requeue(queue, job.text)
            log.warning(
                "sidecar unavailable, job put back on its queue: %s",
                exc,
                extra=job.log_context(queue),
            )
            return "unavailable"
        return self._handle_result(job, queue, execution)

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
        self.history.failed(job, failure.error_class, failure.error_message)
        decision = self.policy.decide(job, failure, queue)
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

    def _carry_out(self, job: Job, queue: str, failure: Failure, decision: Decision) -> str:
        outcome = decision.outcome
        if outcome is Outcome.RETRY:
            if decision.delay <= self.settings.max_celery_countdown:
                raise JobFailed(decision, failure)
            self.park(decision)
            return "parked"
        if outcome is Outcome.DEAD:
            self._bury(decision, failure)
            return "dead"
        if outcome is Outcome.DROP or self.settings.sidekiq_version >= 8:
            # `retry: false` (and 8.x's :discard) still runs the app's death handlers.
            self._exhausted_hooks(decision.job, failure, run_hook=False, death_handlers=True)
        return "dropped" if outcome is Outcome.DROP else "discarded"

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
        delivery = new_delivery_token()
        deadline = time.time() + decision.delay + settings.delivery_timeout
        store.replace_delivery(
            self.request.kwargs.get("delivery"), delivery, queue, decision.job.text, deadline
        )
        # Sidekiq's retry_count is the truth (it survives parking and "Retry now"); make Celery
        # count from it so its max_retries check agrees with Sidekiq's.
        self.request.retries = decision.job.get("retry_count")
        try:
            return super().retry(
                args=(decision.job.text, queue),
                kwargs={"delivery": delivery},
                exc=exc,
                throw=throw,
                countdown=decision.delay,
                # Always explicit: Celery 5.7 keeps a per-call override on the shared task object.
                max_retries=decision.limit,
                argsrepr=argsrepr(decision.job, queue),
                queue=settings.celery_queue(queue),
            )
        except Reject:
            # Re-publishing failed (broker down): keep the job in Sidekiq's retry set instead.
            self.worker.park(decision)
            store.settle_deliveries([delivery])
            return Ignore()


# Not shared: other Celery apps in the same process (the bridge's, tests') must not inherit it.
@app.task(bind=True, base=PerformTask, name=TASK_NAME, shared=False)
def perform(self: PerformTask, payload: str, queue: str, delivery: str | None = None) -> str:
    return self.worker.perform(payload, queue, delivery)


@worker_shutdown.connect  # the threads pool (and solo) run jobs in the main process
@worker_process_shutdown.connect  # prefork: each child has its own settler
def _flush_settlements(**_kwargs) -> None:
    worker = perform.__dict__.get("worker")  # built on a process's first job, if any
    if worker is not None:
        worker.settler.flush()
        worker.history.close()
