"""No job lost, ever: real `gokiq-bridge` processes killed with SIGKILL, stopped with SIGTERM,
run three at a time, cut off from their broker, and held back by backpressure."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import random
import time
import urllib.request
from datetime import UTC, datetime

import pybreaker
import redis

from bridge.broker_restarts import BrokerRestarts
from gokiq_celery.sidekiq.keys import BREAKER_NAMESPACE, BROKER_RUN_ID

from .bridge_support import BridgeProcess, Env, bridge_env, bridge_redis, make_job, wait_for
from .conftest import free_port, start_redis

__all__ = ["bridge_env", "bridge_redis"]  # fixtures used below

FAST_RECOVERY = ("--heartbeat-ttl", "1", "--recovery-interval", "0.5", "--max-pending", "10000000")


def jids(n: int, start: int = 0) -> list[str]:
    return [f"{i:024x}" for i in range(start, start + n)]


def test_kill_9_repeatedly_while_draining_loses_nothing(bridge_env):
    total, batch = 10_000, 50
    bridge_env.push("default", [make_job(i) for i in range(total)])
    args = (*FAST_RECOVERY, "--batch-size", str(batch))
    rng = random.Random(5)
    kills = 0
    while kills < 5 and bridge_env.store().queues.size("default") > 0:
        bridge = BridgeProcess(bridge_env, *args, name=f"killed-{kills}")
        before = bridge_env.broker_count("default")
        # Kill it while it publishes: wait for its first publish, then a little more.
        wait_for(
            lambda b=before, p=bridge: bridge_env.broker_count("default") > b or not p.alive(),
            timeout=30,
            interval=0.005,
        )
        time.sleep(rng.uniform(0, 0.05))
        bridge.kill()
        kills += 1
    assert kills >= 3, "the bridge drained everything before it could be killed 3 times"

    with BridgeProcess(bridge_env, *args, name="survivor") as survivor:
        # The survivor recovers the dead bridges' in-flight lists once their heartbeats expire,
        # and unregisters them: a bridge killed with an empty list is released only then, which
        # may be after the survivor drained everything (it is the survivor's own id that stays).
        wait_for(
            lambda: (
                bridge_env.store().queues.size("default") == 0
                and bridge_env.held_by_bridges() == 0
                and set(bridge_env.published_jids("default")) == set(jids(total))
                and len(bridge_env.store().bridges.ids()) <= 1
            ),
            timeout=60,
            interval=0.2,
        )
        assert survivor.terminate() == 0

    published = bridge_env.published_jids("default")
    duplicates = len(published) - total
    assert set(published) == set(jids(total))
    assert duplicates <= kills * batch
    assert bridge_env.store().bridges.ids() == []


def test_three_bridges_at_once_publish_each_job_exactly_once(bridge_env):
    per_queue = 6_000
    bridge_env.push("critical", [make_job(i, "critical") for i in range(per_queue)])
    bridge_env.push("default", [make_job(i, "default") for i in range(per_queue, 2 * per_queue)])
    queues = ("--queues", "critical,3 default,1", "--max-pending", "10000000")
    bridges = [BridgeProcess(bridge_env, *queues, name=f"b{i}") for i in range(3)]
    try:
        wait_for(
            lambda: bridge_env.broker_count("critical", "default") >= 2 * per_queue,
            timeout=60,
            interval=0.1,
        )
        assert [b.terminate() for b in bridges] == [0, 0, 0]
    finally:
        for b in bridges:
            b.__exit__()
    critical = bridge_env.published_jids("critical")
    default = bridge_env.published_jids("default")
    assert sorted(critical) == jids(per_queue)
    assert sorted(default) == jids(per_queue, per_queue)
    assert bridge_env.held_by_bridges() == 0
    # Each stopped cleanly, giving back nothing it should have kept.
    assert all("gokiq-bridge stopped" in b.log() for b in bridges)


def test_sigterm_stops_cleanly_and_gives_back_what_was_not_published(bridge_env):
    total = 30_000
    bridge_env.push("default", [make_job(i) for i in range(total)])
    with BridgeProcess(bridge_env, "--max-pending", "10000000", "--batch-size", "200") as bridge:
        wait_for(lambda: bridge_env.broker_count("default") > 0, timeout=30, interval=0.005)
        assert bridge.terminate() == 0
    published = bridge_env.published_jids("default")
    left = bridge_env.store().queues.size("default")
    assert bridge_env.held_by_bridges() == 0
    assert len(published) == len(set(published))
    assert len(published) + left == total
    assert bridge_env.store().bridges.ids() == []
    if left:  # what was not published is back, the next job to run first
        assert bridge_env.store().queues.oldest("default") == make_job(len(published)).encode()


def test_a_dead_bridges_inflight_jobs_are_recovered_and_published(bridge_env):
    total = 2_000
    bridge_env.push("default", [make_job(i) for i in range(total)])
    # A bridge that took jobs into its in-flight list with the real fetch script, then died
    # before publishing them: its heartbeat (1 s) lapses and nobody acks its jobs.
    store = bridge_env.store()
    store.bridges.register("dead-bridge", ["default"], ttl=1)
    _, taken = store.queues.fetch_jobs("dead-bridge", ["default"], 500)
    held = bridge_env.held_by_bridges()
    assert held == len(taken) == 500
    # Started before the dead bridge's 1 s heartbeat expires: its periodic recovery finds it.
    with BridgeProcess(bridge_env, *FAST_RECOVERY, name="healthy") as healthy:
        wait_for(
            lambda: set(bridge_env.published_jids("default")) == set(jids(total)),
            timeout=60,
            interval=0.2,
        )
        recovered = [line for line in healthy.log_lines() if "dead_bridge" in line]
        assert sum(line["returned"] for line in recovered) >= held
        assert healthy.terminate() == 0
    assert bridge_env.held_by_bridges() == 0
    assert bridge_env.store().bridges.ids() == []


def test_broker_down_then_back_publishes_everything(bridge_env, tmp_path):
    port = free_port()
    brokers = [start_redis(tmp_path / "broker", port)]
    bridge_env.push("default", [make_job(i) for i in range(100)])
    try:
        with BridgeProcess(
            bridge_env, "--broker-url", brokers[0].url(0), "--max-pending", "100000"
        ) as bridge:
            wait_for(lambda: brokers[0].client(0).llen("default") == 100, timeout=30)
            brokers[0].process.kill()
            brokers[0].process.wait(10)
            bridge_env.push("default", [make_job(i) for i in range(100, 300)])
            time.sleep(1.5)
            assert bridge.alive()
            # Nothing is lost: what the bridge took is in the delivery ledger, even the first
            # 100, which the dead broker had accepted (the ledger publishes them again later).
            store = bridge_env.store()
            taken = store.ledger.pending() + bridge_env.held_by_bridges()
            assert store.queues.size("default") + taken == 300
            # A new, empty broker on the same port: the first 100 were lost with the old one.
            brokers.append(start_redis(tmp_path / "broker", port))
            wait_for(lambda: brokers[1].client(0).llen("default") == 200, timeout=30)
            assert bridge.terminate() == 0
        assert any("retrying in" in line.get("msg", "") for line in bridge.log_lines())
    finally:
        for broker in brokers:
            broker.process.kill()
            broker.process.wait(10)


def test_a_broker_restart_publishes_again_at_once_what_its_last_fetch_may_have_lost(tmp_path):
    """kombu's BRPOP ran on a Redis that then exited before replying: the message is in no
    queue and no `unacked` record, only in the ledger. Once the restarted broker answers (same
    port and data, AOF on), the bridge publishes every unclaimed delivery of before the restart
    again within seconds, not at delivery_timeout (300 s); the copy a broker may still hold is
    stale. A claimed delivery (a live worker runs it) is left alone."""
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    env = Env(server, 0, tmp_path)
    store = env.store()
    lost, running = make_job(1), make_job(2)
    store.ledger.record([("lost", "default", lost), ("running", "default", running)], time.time())
    store.ledger.extend(["lost", "running"], time.time() + 300)  # published: delivery_timeout
    assert store.ledger.claim("running", time.time() + 600, "worker-1")

    def worker_alive_and(read):
        with contextlib.suppress(redis.ConnectionError):  # the worker beats while Redis is up
            env.store().ledger.beat_worker("worker-1")
        return read()

    try:
        with BridgeProcess(env, "--max-pending", "1000") as bridge:
            run_id = server.client(1).info("server")["run_id"].encode()
            wait_for(lambda: env.redis.get(BROKER_RUN_ID) == run_id, timeout=15)
            server.process.terminate()
            server.process.wait(10)
            time.sleep(1)
            server = start_redis(server.dir, server.port, "--appendonly", "yes")
            [message] = wait_for(lambda: worker_alive_and(lambda: env.messages("default")), 15)
            time.sleep(1)
            assert worker_alive_and(lambda: env.broker_count("default")) == 1
            assert bridge.terminate() == 0
        token = message["kwargs"]["delivery"]
        assert message["args"] == [lost, "default"] and token != "lost"
        assert env.store().ledger.tokens() == sorted([token, "running"])
        assert not env.store().ledger.claim("lost", time.time() + 600, "worker-2")  # stale
        said = [line for line in bridge.log_lines() if "broker's Redis restarted" in line["msg"]]
        assert [line["returned"] for line in said] == [1]
    finally:
        server.process.kill()
        server.process.wait(10)


def test_a_rabbitmq_broker_is_not_watched_for_restarts(bridge_env):
    """RabbitMQ keeps a delivery until it is acked: no fetch is lost by a restart."""
    ledger = bridge_env.store().ledger
    watch = BrokerRestarts.for_broker("amqp://guest:guest@127.0.0.1:5672//", ledger, 300)
    assert watch.broker is None and watch.check() is None
    assert BrokerRestarts.for_broker(bridge_env.broker_url, ledger, 300).check() is None
    assert bridge_env.redis.get(BROKER_RUN_ID)  # a Redis broker's run_id: recorded


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_redis_broker_without_info_is_left_unwatched(bridge_env, tmp_path):
    """INFO renamed away (some managed Redis): said once, then no more checks."""
    server = start_redis(tmp_path / "redis", None, "--rename-command", "INFO", "")
    log, said_lines = logging.getLogger("gokiq.bridge"), _Said()
    level, log.level = log.level, logging.WARNING  # other tests configure gokiq's logging
    log.addHandler(said_lines)
    try:
        watch = BrokerRestarts.for_broker(server.url(1), bridge_env.store().ledger, 300)
        assert watch.check() is None and watch.broker is None
        assert watch.check() is None
        [said] = [message for message in said_lines.messages if "run_id" in message]
        assert said.lower().startswith("cannot read the broker's run_id (unknown command 'info'")
    finally:
        log.removeHandler(said_lines)
        log.level = level
        server.process.kill()
        server.process.wait(10)


def test_backpressure_pauses_at_max_pending_and_resumes(bridge_env):
    bridge_env.push("default", [make_job(i) for i in range(500)])
    with BridgeProcess(bridge_env, "--max-pending", "50", "--batch-size", "100") as bridge:
        wait_for(lambda: bridge_env.broker_count("default") == 50, timeout=30)
        time.sleep(0.5)
        assert bridge_env.broker_count("default") == 50
        assert bridge_env.store().queues.size("default") == 450
        seen = collections.Counter()
        # A "worker" drains the Celery queue; the bridge refills it up to the limit.
        deadline = time.monotonic() + 30
        while len(seen) < 500 and time.monotonic() < deadline:
            for jid in bridge_env.published_jids("default"):
                seen[jid] += 1
            bridge_env.broker.delete("default")
            time.sleep(0.05)
        assert sorted(seen) == jids(500)
        assert bridge.terminate() == 0


def test_an_open_sidecar_breaker_pauses_the_bridge(bridge_env):
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, bridge_env.redis, namespace=BREAKER_NAMESPACE
    )
    storage.state = pybreaker.STATE_OPEN
    storage.opened_at = datetime.now(UTC)
    bridge_env.push("default", [make_job(i) for i in range(20)])
    with BridgeProcess(bridge_env, "--max-pending", "1000") as bridge:
        time.sleep(2.5)  # started and looked at the breaker
        assert bridge_env.broker_count("default") == 0
        assert bridge_env.store().queues.size("default") == 20
        storage.state = pybreaker.STATE_CLOSED
        wait_for(lambda: bridge_env.broker_count("default") == 20, timeout=10)
        assert bridge.terminate() == 0


def test_overdue_deliveries_are_published_again_under_a_new_token(bridge_env):
    """A message the broker lost (e.g. with a SIGKILLed worker) is still in the ledger."""
    store = bridge_env.store()
    job = make_job(7)
    store.ledger.record([("lost-token", "default", job)], deadline=time.time() - 1)
    with BridgeProcess(bridge_env, *FAST_RECOVERY, name="reaper") as bridge:
        wait_for(lambda: bridge_env.broker_count("default") == 1, timeout=15)
        assert bridge.terminate() == 0
    [message] = bridge_env.messages("default")
    token = message["kwargs"]["delivery"]
    assert message["args"] == [job, "default"] and token != "lost-token"
    assert store.ledger.tokens() == [token]
    assert any("published 1 jobs again" in line.get("msg", "") for line in bridge.log_lines())


def test_a_poison_ledger_entry_is_buried_and_republishing_goes_on(bridge_env):
    """An entry an older gokiq let in (now refused by Job.parse) made every round raise: the
    fetch loop never fetched again. And a retry_queue is not a label of republished_total."""
    store = bridge_env.store()
    poison = make_job(1, retry_count="abc")
    past = time.time() - 1
    store.ledger.record([("poison", "default", poison)], deadline=past)
    store.ledger.record([("lost", "default", make_job(2))], deadline=past)
    store.ledger.record([("odd", "spam-queue", make_job(3, "spam-queue"))], deadline=past)
    port = free_port()
    with BridgeProcess(bridge_env, *FAST_RECOVERY, "--metrics-port", str(port)) as bridge:
        wait_for(lambda: bridge_env.broker_count("default") == 1, timeout=15)
        bridge_env.push("default", [make_job(4)])
        wait_for(lambda: bridge_env.broker_count("default") == 2, timeout=15)
        wait_for(lambda: bridge_env.broker_count("spam-queue") == 1, timeout=15)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert bridge.alive()
    [(dead, _)] = store.dead.entries()
    assert json.loads(dead)["error_class"] == "Gokiq::InvalidJob"
    assert "poison" not in store.ledger.tokens() and len(store.ledger.tokens()) == 3
    assert 'gokiq_bridge_republished_total{queue="(other)"} 1.0' in page
    assert "spam-queue" not in page
