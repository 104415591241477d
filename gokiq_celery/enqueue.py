"""`gokiq.enqueue`: a Celery task that enqueues one of the Rails app's Sidekiq jobs.

What Celery beat calls to schedule a Rails job (README, "Periodic jobs"): the job is pushed into
Sidekiq's Redis exactly as `Sidekiq::Client.push` would (`gokiq_celery.client`), and from there
runs wherever its queue is consumed (gokiq, or a Ruby Sidekiq). Any gokiq worker runs it: it
goes to the Celery app's default queue unless routed elsewhere. Celery delivers at least once
(acks are late), so a worker lost between the push and the ack can push the job twice.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .celery_app import app
from .client import SidekiqClient
from .settings import process_settings

ENQUEUE_TASK = "gokiq.enqueue"

log = logging.getLogger("gokiq.enqueue")


@functools.cache
def _client() -> SidekiqClient:
    """One client (one Redis connection pool) per process, built on its first use."""
    return SidekiqClient.from_settings(process_settings())


@app.task(name=ENQUEUE_TASK, shared=False)
def enqueue(job_class: str, args: list[Any] | None = None, **options: Any) -> str:
    """Push one Sidekiq job; `options` as `SidekiqClient.push` (queue, retry, at, in_, ...).
    Returns the job's jid. The job's arguments are not logged."""
    jid = _client().push(job_class, args or [], **options)
    log.info("enqueued", extra={"jid": jid, "class": job_class, "queue": options.get("queue")})
    return jid
