"""Celery settings for `celery -A gokiq_celery`, derived from gokiq's settings (gokiq.yml + env).

`celery_config(settings)` is what gokiq's Celery app is configured with: gokiq_celery/celery_app.py
asks for it when Celery first reads its configuration (as a worker, Flower or beat starts), not
when anything is imported. Only Celery's settings live here; what a job means is in gokiq_celery.
"""

from __future__ import annotations

import sys
from typing import Any

from kombu import Queue

from gokiq_celery.settings import ConfigError, Settings, process_settings


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {"broker_url": settings.broker_url}
    if settings.broker_url.startswith("redis://"):
        # kombu's Redis transport, reusing one command client instead of building one per ack
        # and per event (gokiq_celery/kombu_redis.py).
        config["broker_transport"] = "gokiq_celery.kombu_redis:Transport"
    config["broker_connection_retry_on_startup"] = True
    # A countdown retry waits unacked in the worker; the broker must not hand it to another
    # worker before it is due and has run: keep the visibility timeout well above the longest
    # wait + run.
    config["broker_transport_options"] = {
        "visibility_timeout": max(
            3600, 2 * int(settings.job_timeout + settings.max_celery_countdown)
        )
    }

    # At-least-once: ack after the job ran, redeliver if the worker dies.
    config["task_acks_late"] = True
    config["task_reject_on_worker_lost"] = True
    # A worker holds concurrency x this many messages unacked. With 1, a slot whose job ended
    # waits for its ack to reach the broker and the next message to come back before it runs
    # again (20 ms jobs at concurrency 20: ~2 of 20 slots idle, bench/vs_sidekiq.py); with 2 the
    # next message is already here. A held message is claimed only when it starts, so a worker
    # that dies hands it back like any unclaimed delivery (README, "Reliability"). Set 1 for
    # long jobs on several workers: a held message waits behind its worker's running jobs.
    config["worker_prefetch_multiplier"] = settings.worker_prefetch_multiplier
    config["worker_cancel_long_running_tasks_on_connection_loss"] = True

    config["task_ignore_result"] = True
    config["result_backend"] = None
    config["task_serializer"] = "json"
    config["accept_content"] = ["json"]
    config["timezone"] = "UTC"

    # Task events are what Flower shows. A worker sends them only once asked: Flower asks every
    # worker when it starts and every few seconds after (its enable_events control command), so
    # it sees every job while it runs, and no worker pays for events nobody reads (they cost
    # about a third of a no-op job's CPU). `celery worker -E` sends them from the start.
    config["worker_send_task_events"] = False
    # No task-sent events: Celery names the real task (`gokiq.perform`) in them, not the job's
    # class, and Flower lets a task-sent event that arrives after task-received rename the task.
    config["task_send_sent_event"] = False

    # A worker started without -Q consumes every queue gokiq is configured to hand over.
    task_queues = [Queue(settings.celery_queue(q.name)) for q in settings.queues]
    config["task_queues"] = task_queues
    config["task_default_queue"] = task_queues[0].name
    config["task_create_missing_queues"] = True

    # Each task waits on one HTTP call to the sidecar; the work happens in Ruby. Threads keep 20
    # waiting calls in one process of ~65 MB; prefork got no more done on a 2-core host
    # (bench/worker.py: ~420-850 against ~815-900 tasks/s with threads) for 20 processes'
    # memory (1.1 GB); on more cores, one threads worker per core scales out for less. Set by
    # GOKIQ_WORKER_POOL: Celery cannot tell an explicit `--pool=prefork` from its default, so a
    # pool configured here wins over that flag.
    config["worker_pool"] = settings.worker_pool
    config["worker_concurrency"] = settings.worker_concurrency
    config["worker_hijack_root_logger"] = False
    return config


def process_celery_config() -> dict[str, Any]:
    """`celery_config` of this process's settings; a bad setting stops the process with one
    clear line naming it (exit status 2), not a traceback."""
    try:
        settings = process_settings()
    except ConfigError as exc:
        print(f"gokiq: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return celery_config(settings)
