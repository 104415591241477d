"""The workers on Sidekiq's Busy page: what they write is read back by Sidekiq's own Ruby API
(`Sidekiq::ProcessSet`, `Sidekiq::WorkSet` of the installed Sidekiq 6.4.1), from a real
embedded Celery worker and a real redis-server."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from celery.contrib.testing.worker import start_worker

from gokiq_celery.celery_app import app
from gokiq_celery.heartbeat import SidekiqProcess, log_thread_stacks
from gokiq_celery.messages import TASK_NAME, publish_options
from gokiq_celery.settings import load_settings
from gokiq_celery.sidecar import SidecarClient
from gokiq_celery.sidekiq import Job, RetryPolicy, SidekiqStore
from gokiq_celery.sidekiq.keys import PROCESSES
from gokiq_celery.worker import Worker, install_worker

from .conftest import sidekiq_processes, wait_for
from .stand_in_sidecar import TOKEN, StandInSidecar


def slow_job(seconds: float) -> Job:
    return Job.build(
        {"class": "SlowJob", "args": [seconds], "jid": os.urandom(12).hex(), "queue": "default"}
    )


def test_a_beat_is_what_sidekiq_reads(redis_url, redis_client):
    settings = load_settings(redis_url=redis_url, sidekiq_version=6)
    process = SidekiqProcess(
        settings, SidekiqStore(redis_client), 20, ["default", "low"], "celery@web-1"
    )

    class Running:  # the two attributes of a Celery request that a beat reads
        args = (slow_job(5).text, "low")
        time_start = time.time() - 3

    running = Running()
    assert process.beat([running]) is None

    view = sidekiq_processes(redis_url)
    [seen] = view["processes"]
    assert seen["identity"] == process.identity
    assert (seen["tag"], seen["labels"], seen["pid"]) == ("gokiq", ["celery@web-1"], os.getpid())
    assert (seen["concurrency"], seen["queues"], seen["busy"]) == (20, ["default", "low"], 1)
    assert seen["stopping"] is False and seen["rss"] > 1000
    [(identity, _tid, work)] = view["work"]
    assert identity == process.identity
    assert work["queue"] == "low"
    assert work["payload"]["jid"] == Job.parse(running.args[0]).jid
    assert work["run_at"] == int(running.time_start)

    process.beat([])  # the job is done: gone from the Busy page at the next beat
    assert sidekiq_processes(redis_url)["work"] == []

    # The Busy page's Quiet button: queued for the process, popped by its next beat.
    sidekiq_processes(redis_url, "quiet")
    assert process.beat([]) == "TSTP"

    process.leave()
    assert redis_client.smembers(PROCESSES) == set()
    assert sidekiq_processes(redis_url)["processes"] == []


def test_sidekiq_7_names_the_work_hash_work(redis_url, redis_client):
    settings = load_settings(redis_url=redis_url, sidekiq_version=7)
    process = SidekiqProcess(settings, SidekiqStore(redis_client), 5, ["default"], "celery@x")

    class Running:
        args = (slow_job(1).text, "default")
        time_start = time.time()

    process.beat([Running()])
    assert redis_client.hlen(f"{process.identity}:work") == 1
    assert not redis_client.exists(f"{process.identity}:workers")  # 6.4.1's name
    info = json.loads(redis_client.hget(process.identity, "info"))
    assert info["weights"] == [{"default": 0}]
    assert info["version"].startswith("gokiq")  # the Busy page shows it beside Sidekiq's own


def test_sidekiq_6_4_1_gets_its_running_jobs_under_workers_only(redis_url, redis_client):
    """A full version says which name the app's Busy page reads: 6.4.1 reads `:workers`."""
    settings = load_settings(redis_url=redis_url, sidekiq_version="6.4.1")
    process = SidekiqProcess(settings, SidekiqStore(redis_client), 5, ["default"], "celery@x")

    class Running:
        args = (slow_job(1).text, "default")
        time_start = time.time()

    process.beat([Running()])
    [(identity, _tid, work)] = sidekiq_processes(redis_url)["work"]
    assert (identity, work["queue"]) == (process.identity, "default")
    assert redis_client.hlen(f"{process.identity}:workers") == 1
    assert not redis_client.exists(f"{process.identity}:work")  # 6.4.2's name


def test_no_beat_until_the_sidekiq_version_is_known(redis_url, redis_client, caplog):
    """`auto` and no sidecar has published the version: nothing on the Busy page, said once."""
    settings = load_settings(redis_url=redis_url)
    process = SidekiqProcess(settings, SidekiqStore(redis_client), 5, ["default"], "celery@x")

    class Running:
        args = (slow_job(1).text, "default")
        time_start = time.time()

    with caplog.at_level(logging.WARNING, logger="gokiq.worker"):
        assert process.beat([Running()]) is None
        assert process.beat([]) is None
    assert sidekiq_processes(redis_url) == {"processes": [], "work": []}
    assert not redis_client.exists(process.identity, f"{process.identity}:work")
    waiting = [r.getMessage() for r in caplog.records if "Busy page yet" in r.getMessage()]
    assert len(waiting) == 1 and "GOKIQ_SIDEKIQ_VERSION" in waiting[0]
    process.leave()  # never listed: nothing to take off


@contextlib.contextmanager
def embedded_worker(redis_server, redis_db):
    """An embedded worker (threads, concurrency 3) beating every 0.2 s into a Sidekiq 6
    registry; yields (Sidekiq's Redis URL, the store, the stand-in sidecar)."""
    sidekiq_url, broker_db = redis_server.url(redis_db), 62
    redis_server.client(broker_db).flushdb()
    app.conf.broker_url = redis_server.url(broker_db)
    # Quiet deselects queues in the app's own queue table: put it back for the next worker.
    queues = app.amqp.queues
    selected, default = queues._consume_from, dict(queues._default_consume_from)
    selected = None if selected is None else dict(selected)
    with StandInSidecar() as sidecar:
        settings = load_settings(
            redis_url=sidekiq_url,
            sidecar_url=sidecar.url,
            sidecar_token=TOKEN,
            sidekiq_version=6,
            sidekiq_heartbeat=0.2,
        )
        store = SidekiqStore.from_settings(settings)
        policy = RetryPolicy(settings.max_retries, settings.sidekiq_version)
        before = install_worker(
            Worker(settings, store, SidecarClient(settings, store.redis), policy)
        )
        try:
            with start_worker(
                app, pool="threads", concurrency=3, perform_ping_check=False, shutdown_timeout=10
            ):
                yield sidekiq_url, store, sidecar
        finally:
            queues._consume_from, queues._default_consume_from = selected, default
            install_worker(before)
            redis_server.client(broker_db).flushdb()


def send(job: Job) -> None:
    # Its own connection: the app's producer pool would keep this broker for later test modules.
    with app.connection_for_write() as connection, connection.Producer() as producer:
        options = publish_options(job, "default")
        app.send_task(
            TASK_NAME, args=(job.text, "default"), queue="default", producer=producer, **options
        )


def test_a_worker_shows_its_running_jobs_and_leaves_when_it_stops(redis_server, redis_db):
    with embedded_worker(redis_server, redis_db) as (sidekiq_url, store, _sidecar):
        job = slow_job(3)
        send(job)

        def running() -> list:
            work = sidekiq_processes(sidekiq_url)["work"]
            return [w for w in work if w[2]["payload"]["jid"] == job.jid]

        wait_for(running, timeout=15, message="the running job never showed on the Busy page")
        [process] = sidekiq_processes(sidekiq_url)["processes"]
        assert (process["tag"], process["concurrency"], process["busy"]) == ("gokiq", 3, 1)
        assert process["queues"] == ["default", "critical", "low"]  # GOKIQ_QUEUES (conftest)
        assert store.redis.smembers(PROCESSES) == {process["identity"].encode()}
    assert store.redis.smembers(PROCESSES) == set()  # a clean shutdown leaves the registry


def test_quiet_from_the_busy_page_stops_taking_jobs(redis_server, redis_db):
    with embedded_worker(redis_server, redis_db) as (sidekiq_url, store, sidecar):
        wait_for(lambda: sidekiq_processes(sidekiq_url)["processes"], timeout=15)
        sidekiq_processes(sidekiq_url, "quiet")  # the Busy page's Quiet button
        # Shown as stopping once the consumer has cancelled its queues.
        wait_for(lambda: sidekiq_processes(sidekiq_url)["processes"][0]["stopping"], timeout=10)
        job = slow_job(0)
        send(job)
        time.sleep(2)
        assert sidecar.executed(job.jid) == []  # quiet: the job waits in the broker
        assert store.redis.smembers(PROCESSES)  # and the process stays listed, as Sidekiq's does


def test_ttin_logs_every_thread_stack(caplog):
    caplog.set_level("WARNING", logger="gokiq.worker")
    log_thread_stacks()
    mine = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("thread MainThread")
    ]
    assert mine and "test_ttin_logs_every_thread_stack" in mine[0]
