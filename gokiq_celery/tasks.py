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
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_init, worker_process_shutdown, worker_shutdown

from .celery_app import app
from .messages import TASK_NAME, new_delivery_token, retry_publish_options
from .worker import (
    JobEnded,
    JobFailed,
    JobParked,
    current_worker,
    start_worker_process,
    stop_worker_process,
)

log = logging.getLogger("gokiq.worker")


class PerformTask(Task):
    """Celery's retry machinery, driven by Sidekiq's count: `request.retries` = failures so far."""

    autoretry_for = (JobFailed,)
    throws = (JobEnded,)  # an expected failure: logged in one line, no traceback
    retry_backoff = False  # the delay is Sidekiq's curve (count⁴ + 15 + jitter), set per retry
    retry_jitter = False
    acks_late = True
    typing = False

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
        worker = current_worker()
        settings, store = worker.settings, worker.store
        delivery = new_delivery_token()  # enters the ledger when its countdown claims the retry
        store.ledger.fail_into_retry_set(
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
        return current_worker().perform(payload, queue, delivery, retry_set)
    except JobParked as parked:  # acked like any retry: the job waits in Sidekiq's retry set
        raise Retry(exc=parked, when=parked.delay) from None


@worker_init.connect  # in the main process, before a prefork pool forks its children
def _start_worker_process(sender=None, **_kwargs) -> None:
    if getattr(sender, "app", None) is app:
        start_worker_process()


@worker_shutdown.connect  # the threads pool (and solo) run jobs in the main process
@worker_process_shutdown.connect  # prefork: each child has its own settler
def _stop_worker_process(**_kwargs) -> None:
    stop_worker_process()
