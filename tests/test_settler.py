"""DeliverySettler against a real redis-server: settlements are batched, none is lost when Redis
is away for a moment, and a worker's shutdown writes what is pending."""

from __future__ import annotations

import time

import redis
from celery.signals import worker_process_shutdown, worker_shutdown

import gokiq_celery.tasks  # noqa: F401  (connects the shutdown signals)
from gokiq_celery.messages import new_delivery_token
from gokiq_celery.settings import load_settings
from gokiq_celery.settler import DeliverySettler
from gokiq_celery.sidekiq import RetryPolicy, SidekiqStore
from gokiq_celery.sidekiq.keys import WORKERS
from gokiq_celery.sidekiq.ledger import WORKER_BEAT
from gokiq_celery.worker import Worker, install_worker

from .conftest import free_port, wait_for


def entered(store: SidekiqStore, n: int) -> list[str]:
    tokens = [new_delivery_token() for _ in range(n)]
    store.ledger.record([(t, "default", '{"class":"A","args":[]}') for t in tokens], 1e10)
    return tokens


def test_settlements_of_many_jobs_go_in_a_few_transactions(redis_client):
    store = SidekiqStore(redis_client)
    tokens = entered(store, 200)
    settler = DeliverySettler(store, interval=0.05)
    redis_client.config_resetstat()
    for i, token in enumerate(tokens):
        settler.settle(token, processed=1, failed=int(i % 4 == 0))
    wait_for(lambda: store.ledger.pending() == 0, message="never settled")
    wait_for(lambda: store.stats.counts() == {"processed": 200, "failed": 50})
    assert redis_client.info("commandstats")["cmdstat_exec"]["calls"] <= 5


def test_a_flush_while_redis_is_away_keeps_everything_for_the_next(redis_client):
    store = SidekiqStore(redis_client)
    tokens = entered(store, 3)
    away = SidekiqStore(redis.Redis(port=free_port(), socket_connect_timeout=0.2))
    settler = DeliverySettler(away, interval=3600)  # only explicit flushes here
    for token in tokens:
        settler.settle(token, processed=1)
    settler.flush()  # fails: nothing listens there
    settler.store = store
    settler.flush()
    assert store.ledger.pending() == 0 and store.stats.counts()["processed"] == 3


def test_a_worker_shutting_down_writes_what_is_pending(redis_url, redis_client):
    settings = load_settings(redis_url=redis_url)
    store = SidekiqStore(redis_client)
    worker = Worker(settings, store, sidecar=None, policy=RetryPolicy())
    worker.settler.interval = 3600  # the flusher thread would not write for an hour
    saved = install_worker(worker)
    try:
        for signal in (worker_shutdown, worker_process_shutdown):  # threads pool, prefork child
            tokens = entered(store, 2)
            for token in tokens:
                worker.settler.settle(token, processed=1)
            assert store.ledger.pending() == 2
            signal.send(sender=None)
            assert store.ledger.pending() == 0
        assert store.stats.counts()["processed"] == 4
    finally:
        install_worker(saved)


def test_the_settling_thread_keeps_the_process_alive_in_the_ledger_until_it_leaves(redis_client):
    """Between claims (a long job, an idle worker) the thread's beats are the process's signs of
    life; a clean exit leaves, so a bridge has nothing to hand back."""
    store = SidekiqStore(redis_client)
    settler = DeliverySettler(store)
    settler.start()
    wait_for(lambda: redis_client.zscore(WORKERS, settler.holder), message="no beat")
    redis_client.zadd(WORKERS, {settler.holder: 0})  # as if its last sign of life were old
    wait_for(
        lambda: redis_client.zscore(WORKERS, settler.holder) > time.time() - 10,
        timeout=WORKER_BEAT + 5,
        message="the beat stopped",
    )
    settler.leave()
    assert redis_client.zrange(WORKERS, 0, -1) == []
