"""The one task, `gokiq.perform`: Celery's side of running a Sidekiq job (gokiq_celery/worker.py
runs it) and of retrying it.

A failure's fate is Sidekiq's (`RetryPolicy`); Celery carries it out. Every pending retry waits
in Sidekiq's `retry` set, so the Web UI's Retries tab, Retry Now, Delete and Kill work on it,
and it comes back by one of two routes:

- **A Celery countdown** (`autoretry_for = JobFailed`, then `PerformTask.retry`): a retry due
  within `max_celery_countdown` whose queue a worker consumes. The failed run's delivery is
  settled into the retry set in one transaction (`ledger.fail_into_retry_set`) and a countdown
  message is published under a new token; when it fires it runs the job only if its claim
  takes the job's member out of the retry set first (`ledger.claim_retry`). Why: the retry runs
  on time without polling, and Flower shows it as Celery's RETRY.
- **The bridge's poller** (bridge/scheduler.py), which moves a due retry onto its queue like
  any Sidekiq retry: a retry due later than `max_celery_countdown` (a broker cannot hold an
  unacked message for days) or on a queue no worker consumes (`JobParked`, a Celery retry with
  no message), a countdown that could not be published (`retry` raises `Ignore`), and one
  whose countdown is `RETRY_GRACE` late (its worker died).
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
        """Celery's retry of a `JobFailed` run: raises `Retry` once the countdown is
        published, or `Ignore` when it could not be (the poller takes the retry when due)."""
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
            raise Ignore() from None


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
        return str(current_worker().perform(payload, queue, delivery, retry_set))
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
