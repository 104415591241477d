"""Jobs waiting in Redis show in the history: `scheduled` while in `schedule`, `retrying` while
in `retry`, each with its due time (bridge/waiting.py), on a real redis-server and the real
databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time

import redis

from bridge.metrics import BridgeMetrics
from bridge.scheduler import Scheduler
from bridge.waiting import WaitingJobsWatcher
from gokiq_celery.sidekiq.job import Job
from gokiq_celery.sidekiq.keys import RETRY, SCHEDULE
from gokiq_celery.sidekiq.store import SidekiqStore

from .bridge_support import bridge_env, bridge_redis
from .conftest import free_port, wait_for
from .history_support import pg_admin_url, pg_url
from .test_history import db_url, engine, read_job, recorder_for

__all__ = ["bridge_env", "bridge_redis", "db_url", "engine", "pg_admin_url", "pg_url"]

MONTH = 30 * 86400


def hard_job(jid: str, created_at: float, **fields) -> Job:
    return Job.build({"class": "HardJob", "args": [1], "jid": jid, "queue": "low",
                      "created_at": created_at, **fields})  # fmt: skip


def test_scheduled_and_retrying_jobs_show_with_their_due_time(bridge_env, engine, db_url):
    store, now = bridge_env.store(), time.time()
    soon, later = hard_job("soon", now - 5), hard_job("later", now - 5)
    failed = hard_job("failed", now - 100, retry=True, retry_count=1, failed_at=now - 90,
                      retried_at=now - 30, error_class="RuntimeError",
                      error_message="boom")  # fmt: skip
    store.redis.zadd(SCHEDULE, {soon.text: now - 1, later.text: now + MONTH, b"{bad": now})
    store.redis.zadd(RETRY, {failed.text: now + 120})
    recorder = recorder_for(db_url)
    watcher = WaitingJobsWatcher(store, recorder)

    assert watcher.complete_pass() == 3  # the garbage member is left to the scheduler
    assert recorder.flush()
    row = read_job(engine, "later")
    assert (row["state"], row["queue"], row["job_class"]) == ("scheduled", "low", "HardJob")
    assert row["due_at"] == now + MONTH and row["created_at"] == now - 5
    row = read_job(engine, "failed")
    assert (row["state"], row["attempts"], row["error_class"]) == ("retrying", 2, "RuntimeError")
    assert (row["due_at"], row["error_at"], row["error_message"]) == (now + 120, now - 30, "boom")

    # Seen already: a second pass records nothing; a job given another due time is seen again.
    assert watcher.complete_pass() == 0
    store.redis.zadd(SCHEDULE, {later.text: now + 2 * MONTH})
    assert watcher.complete_pass() == 1
    assert recorder.flush() and read_job(engine, "later")["due_at"] == now + 2 * MONTH

    # Due: the scheduler enqueues it; the due time stays, and a "scheduled" event written
    # after that (a slow watcher on another bridge) does not take the job back.
    assert read_job(engine, "soon")["state"] == "scheduled"
    scheduler = Scheduler(store, "b1", BridgeMetrics())
    scheduler.history = recorder
    assert scheduler.move_due() == 1
    assert recorder.flush()
    recorder.waiting("scheduled", [(soon, now - 1)], seen_at=time.time())
    assert recorder.flush()
    row = read_job(engine, "soon")
    assert (row["state"], row["due_at"]) == ("enqueued", now - 1)


def test_a_large_set_is_read_in_bounded_slices_and_a_far_future_push_mid_pass_is_seen(
    bridge_env, engine, db_url
):
    store, now = bridge_env.store(), time.time()
    jobs = {hard_job(f"j{i}", now).text: now + i for i in range(2000)}
    store.redis.zadd(SCHEDULE, jobs)  # > 128 members: a hash table, not one listpack
    recorder = recorder_for(db_url)
    watcher = WaitingJobsWatcher(store, recorder)
    watcher.MAX_SLICE = 100
    per_poll = [watcher.poll() for _ in range(5)]  # part of the first pass
    # Pushed mid-pass: at the set's far end and at its head (keyed by due time, not push time).
    pushed = {hard_job("far", now).text: now + 10 * MONTH, hard_job("head", now).text: now - 1}
    store.redis.zadd(SCHEDULE, pushed)
    recorded = sum(per_poll) + watcher.complete_pass()  # the rest of this pass...
    recorded += watcher.complete_pass()  # ...and the next, which sees all that was pushed
    assert max(per_poll) <= 400, per_poll  # ZSCAN's COUNT is a hint, but bounds a slice
    assert recorded == 2002  # each member recorded once
    assert recorder.flush()
    assert read_job(engine, "far")["due_at"] == now + 10 * MONTH
    assert read_job(engine, "head")["state"] == "scheduled"


def test_the_watchers_thread_records_what_is_pushed_survives_redis_errors_and_stops(
    bridge_env, db_url, caplog
):
    store = bridge_env.store()
    recorder = recorder_for(db_url)
    watcher = WaitingJobsWatcher(store, recorder, interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        store.redis.zadd(SCHEDULE, {hard_job("pushed", time.time()).text: time.time() + 60})
        wait_for(lambda: recorder.pending() > 0, timeout=10, message="the push was not seen")
        down = SidekiqStore(redis.Redis(port=free_port(), socket_connect_timeout=0.5))
        watcher.store = down  # Redis gone: logged and retried, the thread goes on
        wait_for(lambda: "cannot read the waiting jobs" in caplog.text, timeout=10)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
