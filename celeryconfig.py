"""Celery settings for `celery -A gokiq_celery`, read from gokiq's settings (gokiq.yml + env).

Only Celery's settings live here; what a job means is in gokiq_celery.
"""

import sys

from kombu import Queue

from gokiq_celery.settings import ConfigError, process_settings

try:
    _settings = process_settings()
except ConfigError as exc:  # one clear line naming the setting, not a traceback
    print(f"gokiq: bad setting: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

broker_url = _settings.broker_url
if broker_url.startswith("redis://"):
    # kombu's Redis transport, reusing one command client instead of building one per ack and
    # per event (gokiq_celery/kombu_redis.py).
    broker_transport = "gokiq_celery.kombu_redis:Transport"
broker_connection_retry_on_startup = True
# A countdown retry waits unacked in the worker; the broker must not hand it to another worker
# before it is due and has run: keep the visibility timeout well above the longest wait + run.
broker_transport_options = {
    "visibility_timeout": max(3600, 2 * int(_settings.job_timeout + _settings.max_celery_countdown))
}

# At-least-once: ack after the job ran, redeliver if the worker dies, take one at a time.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True

task_ignore_result = True
result_backend = None
task_serializer = "json"
accept_content = ["json"]
timezone = "UTC"

# Task events are what Flower shows. A worker sends them only once asked: Flower asks every
# worker when it starts and every few seconds after (its enable_events control command), so it
# sees every job while it runs, and no worker pays for events nobody reads (they cost about a
# third of a no-op job's CPU). `celery worker -E` sends them from the start.
worker_send_task_events = False
# No task-sent events: Celery names the real task (`gokiq.perform`) in them, not the job's class,
# and Flower lets a task-sent event that arrives after task-received rename the task.
task_send_sent_event = False

# A worker started without -Q consumes every queue gokiq is configured to hand over.
task_queues = [Queue(_settings.celery_queue(q.name)) for q in _settings.queues]
task_default_queue = task_queues[0].name
task_create_missing_queues = True

# Each task waits on one HTTP call to the sidecar; the work happens in Ruby. Threads keep 20
# waiting calls in one process of ~65 MB; prefork gets more done on a 2-core host (bench/worker.py:
# ~1,100-2,500 against ~600-1,050 tasks/s) at 20 processes' memory (1.1 GB), and one threads
# worker per core gets the same for less. Set by GOKIQ_WORKER_POOL: Celery cannot tell an explicit
# `--pool=prefork` from its default, so a pool configured here wins over that flag.
worker_pool = _settings.worker_pool
worker_concurrency = _settings.worker_concurrency
worker_hijack_root_logger = False
