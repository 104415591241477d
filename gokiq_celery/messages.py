"""The one Celery message gokiq sends: `gokiq.perform(payload_text, sidekiq_queue, delivery=token)`.

`delivery` is the message's token in the delivery ledger (gokiq_celery/sidekiq/ledger.py): a
worker runs a message only while its token is there.

The bridge publishes it (bridge/envelope.py) and the task re-publishes it on retry
(gokiq_celery/tasks.py); both take the message's options from here (`publish_options`; the
bridge's Redis fast path fills a template from the same functions, and
tests/test_bridge_publish.py checks that its messages are kombu's own) so that Flower shows a
job the same way however it got there.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from .sidekiq.job import Job

TASK_NAME = "gokiq.perform"
ARGSREPR_LIMIT = 200


def new_delivery_token() -> str:
    return secrets.token_hex(12)


def argsrepr(job: Job, queue: str) -> str:
    """What Flower shows as the task's arguments: the job's args, cut short."""
    text = repr(job.args)
    if len(text) > ARGSREPR_LIMIT:
        text = text[: ARGSREPR_LIMIT - 3] + "..."
    return f"{text} queue={queue}"


def celery_retries(job: Job) -> int:
    """Celery's retry counter for a job: runs that failed so far (Sidekiq's retry_count + 1)."""
    count = job.get("retry_count")
    return count + 1 if isinstance(count, int) and not isinstance(count, bool) else 0


def task_id(job: Job) -> str:
    """The Celery task id of a job's run: the jid for its first, `<jid>.<n>` for the run after n
    failures. Flower keeps one record per task id; a run of its own keeps a failed attempt in
    Flower as RETRY (or FAILURE) once the next one has run."""
    jid = job.jid or uuid.uuid4().hex
    failures = celery_retries(job)
    return f"{jid}.{failures}" if failures else jid


def publish_options(job: Job, queue: str) -> dict[str, Any]:
    """`send_task`/`apply_async` options: task id from the jid, shown under the job's class."""
    return {
        "task_id": task_id(job),
        "shadow": job.display_class,
        "argsrepr": argsrepr(job, queue),
        "kwargsrepr": "{}",
        "retries": celery_retries(job),
    }


def retry_publish_options(job: Job, queue: str) -> dict[str, Any]:
    """`Task.retry` options: as `publish_options`, less the retry count Celery sets itself."""
    options = publish_options(job, queue)
    del options["retries"]
    return options
