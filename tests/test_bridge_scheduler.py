"""The poller: due jobs out of `retry` and `schedule`, exactly once, on time, bytes intact."""

from __future__ import annotations

import json
import logging
import threading
import time

from bridge.metrics import BridgeMetrics
from bridge.scheduler import Scheduler
from gokiq_celery.sidekiq.job import poison_entry
from gokiq_celery.sidekiq.keys import DEAD, QUEUES, RETRY, SCHEDULE
from gokiq_celery.sidekiq.scheduled import RETRY_GRACE
from gokiq_celery.sidekiq.version import SidekiqVersionResolver

from .bridge_support import BridgeProcess, bridge_env, bridge_redis, wait_for

__all__ = ["bridge_env", "bridge_redis"]  # fixtures used below

CREATED_AT = "1795415903.1272464"  # 17 significant digits: Lua's cjson would keep 14


def scheduled_job(n: int, queue: str = "default", **extra) -> str:
    """A `perform_in` member as Sidekiq 6.4.1 stores it: no `enqueued_at`
    (docs/sidekiq-protocol.md §8)."""
    fields = {"retry": True, "queue": queue, "class": "HardJob", "args": [n], **extra}
    head = json.dumps(fields, separators=(",", ":"))
    return head[:-1] + f',"jid":"{n:024x}","created_at":{CREATED_AT}}}'


def test_moves_due_jobs_with_enqueued_at_and_created_at_bytes_unchanged(bridge_env):
    store = bridge_env.store()
    now = time.time()
    store.redis.zadd(SCHEDULE, {scheduled_job(1, "low"): now - 5, scheduled_job(2): now + 60})
    store.redis.zadd(RETRY, {scheduled_job(3, "default", retry_count=2): now - RETRY_GRACE - 1})
    metrics = BridgeMetrics()
    moved = Scheduler(store, "b1", metrics, sidekiq_version=7).move_due()
    assert moved == 2
    [low] = store.queues.jobs("low")
    [retried] = store.queues.jobs("default")
    for raw in (low, retried):
        assert f'"created_at":{CREATED_AT}'.encode() in raw
        assert abs(json.loads(raw)["enqueued_at"] - time.time()) < 5
        assert isinstance(json.loads(raw)["enqueued_at"], float)
    assert json.loads(retried)["retry_count"] == 2
    assert {q.decode() for q in store.redis.smembers(QUEUES)} == {"low", "default"}
    assert [m for m, _ in store.scheduled.scheduled_set()] == [scheduled_job(2).encode()]
    assert store.scheduled.retry_set() == []
    assert bridge_env.held_by_bridges() == 0
    assert metrics.scheduler_moved.labels("schedule")._value.get() == 1
    assert metrics.scheduler_moved.labels("retry")._value.get() == 1


def test_sidekiq_8_gets_integer_milliseconds(bridge_env):
    store = bridge_env.store()
    store.redis.zadd(SCHEDULE, {scheduled_job(1): time.time() - 1})
    Scheduler(store, "b1", BridgeMetrics(), sidekiq_version=8).move_due()
    enqueued_at = json.loads(store.queues.jobs("default")[0])["enqueued_at"]
    assert isinstance(enqueued_at, int) and abs(enqueued_at / 1000 - time.time()) < 5


def test_due_jobs_wait_until_the_sidekiq_version_is_known(bridge_env, caplog):
    """`auto`, no sidecar has published the version: enqueued_at's format is unknown, so due
    jobs stay in their set (none taken out), and the log says why, once."""
    store = bridge_env.store()
    store.redis.zadd(SCHEDULE, {scheduled_job(1): time.time() - 1})
    versions = SidekiqVersionResolver("auto", store.published_sidekiq_version)
    scheduler = Scheduler(store, "b1", BridgeMetrics(), versions, poll_interval=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    with caplog.at_level(logging.INFO, logger="bridge.scheduler"):
        thread.start()
        wait_for(lambda: scheduler.waiting, timeout=10)
        time.sleep(0.3)  # many more polls
        stop.set()
        thread.join(10)
    assert store.queues.jobs("default") == []
    assert [m for m, _ in store.scheduled.scheduled_set()] == [scheduled_job(1).encode()]
    assert bridge_env.held_by_bridges() == 0
    waits = [r.getMessage() for r in caplog.records if "version is known" in r.getMessage()]
    assert len(waits) == 1 and "GOKIQ_SIDEKIQ_VERSION" in waits[0]


def test_retry_set_is_served_before_schedule(bridge_env):
    store = bridge_env.store()
    store.redis.zadd(SCHEDULE, {scheduled_job(1): time.time() - 10})
    store.redis.zadd(RETRY, {scheduled_job(2): time.time() - RETRY_GRACE - 1})
    Scheduler(store, "b1", BridgeMetrics()).move_due()
    # LPUSH: the first pushed is the tail, which runs first.
    assert [json.loads(j)["args"] for j in reversed(store.queues.jobs("default"))] == [[2], [1]]


def test_a_member_that_is_not_a_job_goes_to_the_dead_set_raw(bridge_env):
    store = bridge_env.store()
    store.redis.zadd(SCHEDULE, {b"{not json": time.time() - 1, b"[1,2]": time.time() - 1})
    metrics = BridgeMetrics()
    assert Scheduler(store, "b1", metrics).move_due() == 0
    assert sorted(store.redis.zrange(DEAD, 0, -1)) == [b"[1,2]", b"{not json"]
    assert bridge_env.held_by_bridges() == 0
    assert metrics.poison.labels("schedule", "not JSON")._value.get() == 1


def test_poison_in_a_due_batch_is_buried_and_the_batch_goes_on(bridge_env):
    """A member nested 1,000 deep made json.loads raise RecursionError: the poll failed, and
    every poll after it took the same batch again, so none of its jobs ever moved."""
    store = bridge_env.store()
    deep = '{"class":"HardJob","args":' + "[" * 1000 + "]" * 1000 + "}"
    bad_count = scheduled_job(998, retry_count="abc")
    good = [scheduled_job(n) for n in range(150)]  # more than one BATCH of 100
    due = time.time() - RETRY_GRACE - 1
    store.redis.zadd(RETRY, {deep: due, bad_count: due, **dict.fromkeys(good, due)})
    assert Scheduler(store, "b1", BridgeMetrics()).move_due() == 150
    assert store.queues.size("default") == 150
    assert {raw for raw, _ in store.dead.entries()} == {
        deep.encode(),  # too deep to add fields to: kept as it was
        poison_entry(bad_count, "retry_count is not an integer of -1 or more"),
    }
    assert json.loads(poison_entry(bad_count, "x"))["error_class"] == "Gokiq::InvalidJob"
    assert bridge_env.held_by_bridges() == 0


def test_many_schedulers_move_each_job_exactly_once(bridge_env):
    store = bridge_env.store()
    due = time.time() - RETRY_GRACE - 1
    store.redis.zadd(SCHEDULE, {scheduled_job(n): due for n in range(1000)})
    store.redis.zadd(RETRY, {scheduled_job(n): due for n in range(1000, 1500)})
    schedulers = [Scheduler(bridge_env.store(), f"b{i}", BridgeMetrics()) for i in range(3)]
    Scheduler.BATCH = 7  # small batches: many interleavings between the three
    try:
        threads = [threading.Thread(target=s.move_due) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        Scheduler.BATCH = 100
    args = sorted(json.loads(raw)["args"][0] for raw in store.queues.jobs("default"))
    assert args == list(range(1500))
    assert bridge_env.held_by_bridges() == 0


def test_three_bridges_move_1000_due_jobs_each_exactly_once(bridge_env):
    due = time.time() + 2  # after all three bridges are up
    bridge_env.redis.zadd(SCHEDULE, {scheduled_job(n): due for n in range(1000)})
    bridges = [BridgeProcess(bridge_env, "--max-pending", "100000", name=f"s{i}") for i in range(3)]
    try:
        wait_for(lambda: bridge_env.broker_count("default") >= 1000, timeout=30)
        time.sleep(0.5)
        assert [b.terminate() for b in bridges] == [0, 0, 0]
    finally:
        for b in bridges:
            b.__exit__()
    jids = bridge_env.published_jids("default")
    assert sorted(jids) == [f"{n:024x}" for n in range(1000)]
    assert bridge_env.redis.zcard(SCHEDULE) == 0
    assert bridge_env.held_by_bridges() == 0
    payload = bridge_env.messages("default")[0]["args"][0]
    assert f'"created_at":{CREATED_AT}' in payload and '"enqueued_at"' in payload


def test_a_job_due_in_one_second_is_published_within_a_second_of_due(bridge_env):
    with BridgeProcess(bridge_env, "--max-pending", "1000") as bridge:
        wait_for(lambda: bridge_env.store().bridges.ids(), timeout=20)  # it is up
        lateness = []
        for n in range(3):
            due = time.time() + 1
            bridge_env.redis.zadd(SCHEDULE, {scheduled_job(n): due})
            wait_for(lambda n=n: bridge_env.broker_count("default") > n, timeout=5, interval=0.01)
            lateness.append(time.time() - due)
        assert max(lateness) <= 1.0, lateness
        assert all(late >= 0 for late in lateness)
        assert bridge.terminate() == 0


def test_a_retry_is_left_to_its_countdown_for_the_grace_then_taken(bridge_env):
    """A live worker's Celery countdown claims its retry when due: the poller takes a retry
    only once it is RETRY_GRACE late (the worker holding the countdown died)."""
    store = bridge_env.store()
    now = time.time()
    store.redis.zadd(RETRY, {scheduled_job(1): now - 1})
    scheduler = Scheduler(store, "b1", BridgeMetrics())
    assert scheduler.move_due(now) == 0
    assert len(store.scheduled.retry_set()) == 1
    assert scheduler.move_due(now + RETRY_GRACE) == 1
    assert store.scheduled.retry_set() == [] and store.queues.size("default") == 1
