"""Reliable fetch against a real Redis: queue order (weighted and strict), the in-flight
list, recovery of a dead bridge's jobs, and bad payloads."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

from bridge.fetch import QueueOrder, ReliableFetcher
from bridge.runner import Bridge
from gokiq_celery.settings import QueueSpec, parse_queues
from gokiq_celery.sidekiq.job import poison_entry
from gokiq_celery.sidekiq.keys import DEAD, QUEUES, RETRY, SCHEDULE, inflight_key, queue_key

from .bridge_support import (
    BridgeProcess,
    Env,
    bridge_env,
    bridge_redis,
    make_job,
    wait_for,
)
from .conftest import free_port, start_redis

__all__ = ["bridge_env", "bridge_redis"]  # fixtures used below


def test_weighted_order_matches_sidekiq_first_choice_odds():
    order = QueueOrder(parse_queues("critical,3 default,1"), rng=random.Random(7))
    firsts = [order.next()[0] for _ in range(20_000)]
    share = firsts.count("critical") / len(firsts)
    assert 0.73 < share < 0.77
    assert all(sorted(order.next()) == ["critical", "default"] for _ in range(100))


def test_no_weights_or_strict_means_the_declared_order():
    assert QueueOrder(parse_queues("a b c")).next() == ["a", "b", "c"]
    strict = QueueOrder(parse_queues("a,1 b,5 c,9"), strict=True)
    assert all(strict.next() == ["a", "b", "c"] for _ in range(50))
    # 7.0+: every weight 1 is "random", not strict
    assert not QueueOrder([QueueSpec("a", 1), QueueSpec("b", 1)]).strict


def test_weighted_fetch_serves_queues_in_proportion(bridge_env):
    store = bridge_env.store()
    bridge_env.push("critical", [make_job(i, "critical") for i in range(3000)])
    bridge_env.push("default", [make_job(i, "default") for i in range(3000)])
    order = QueueOrder(parse_queues("critical,3 default,1"), rng=random.Random(1))
    fetcher = ReliableFetcher(store, "b1", ["critical", "default"])
    served = [fetcher.fetch(order.next(), 1).queue for _ in range(2000)]  # both stay non-empty
    assert 0.71 < served.count("critical") / len(served) < 0.79


def test_strict_fetch_drains_the_first_queue_first(bridge_env):
    store = bridge_env.store()
    bridge_env.push("critical", [make_job(i, "critical") for i in range(250)])
    bridge_env.push("default", [make_job(i, "default") for i in range(50)])
    order = QueueOrder(parse_queues("critical default"))
    fetcher = ReliableFetcher(store, "b1", ["critical", "default"])
    served = []
    while (batch := fetcher.fetch(order.next(), 100)) is not None:
        served.append((batch.queue, len(batch)))
    assert served == [("critical", 100), ("critical", 100), ("critical", 50), ("default", 50)]


def test_fetch_moves_exact_bytes_into_the_inflight_list_in_run_order(bridge_env):
    store = bridge_env.store()
    payloads = [make_job(1), make_job(2), "{not json", make_job(3, extra="é")]
    bridge_env.push("default", payloads)  # LPUSH: payloads[0] is the tail, runs first
    fetcher = ReliableFetcher(store, "b1", ["default"])
    batch = fetcher.fetch(["default"], 10)
    assert batch.raws == [p.encode() for p in payloads]
    assert store.queues.size("default") == 0
    assert sorted(store.queues.inflight_jobs("b1", "default")) == sorted(batch.raws)
    assert [raw for raw, _ in batch.poison] == [b"{not json"]
    fetcher.hand_over(batch, deadline=1e10)  # the jobs, not the poison, which the bridge buries
    assert store.queues.inflight_jobs("b1", "default") == [b"{not json"]
    assert len(batch.tokens) == 3 and store.ledger.tokens() == sorted(batch.tokens)
    fetcher.bury("default", b"{not json", "not JSON")
    assert store.queues.inflight_jobs("b1", "default") == []
    assert [m for m, _ in store.dead.entries()] == [b"{not json"]


def test_hand_over_of_a_whole_batch_empties_the_inflight_list_and_is_safe_to_repeat(bridge_env):
    store = bridge_env.store()
    bridge_env.push("default", [make_job(i) for i in range(50)])
    fetcher = ReliableFetcher(store, "b1", ["default"])
    batch = fetcher.fetch(["default"], 50)
    assert fetcher.hand_over(batch, deadline=1e10) == []
    assert store.queues.inflight_jobs("b1", "default") == []
    assert store.ledger.tokens() == sorted(batch.tokens)
    # The script ran but its reply was lost: the same call again enters nothing new, drops none.
    batch.handed_over = False
    assert fetcher.hand_over(batch, deadline=1e10) == []
    assert len(batch.jobs) == 50 and store.ledger.pending() == 50


def test_hand_over_skips_jobs_another_bridge_gave_back_while_this_one_stalled(bridge_env):
    store = bridge_env.store()
    bridge_env.push("default", [make_job(i) for i in range(6)])
    store.bridges.register("stalled", ["default"], ttl=0.1)
    fetcher = ReliableFetcher(store, "stalled", ["default"])
    batch = fetcher.fetch(["default"], 4)
    time.sleep(0.2)
    assert store.bridges.recover_dead() == {"stalled": 4}  # back on the queue, run by others
    fetched = list(batch.jobs)
    assert fetcher.hand_over(batch, deadline=1e10) == fetched
    assert batch.jobs == [] and batch.tokens == [] and store.ledger.pending() == 0
    assert store.queues.size("default") == 6


def test_release_puts_jobs_back_at_the_tail_in_their_original_order(bridge_env):
    store = bridge_env.store()
    bridge_env.push("default", [make_job(i) for i in range(10)])
    store.bridges.register("gone", ["default"], ttl=0.2)
    fetched = store.queues.fetch_jobs("gone", ["default"], 4)[1]
    store.redis.zadd(SCHEDULE, {make_job(99): time.time() + 3600})
    moving = store.scheduled.take_due(SCHEDULE, "gone", time.time() + 7200, 10)
    assert len(moving) == 1
    assert store.bridges.recover_dead() == {}  # heartbeat still there
    time.sleep(0.3)
    assert store.bridges.recover_dead() == {"gone": 5}
    # The four fetched jobs run next again, in the same order as before.
    assert store.queues.jobs("default")[-4:] == list(reversed(fetched))
    assert [m for m, _ in store.scheduled.scheduled_set()] == moving
    assert store.bridges.ids() == []
    assert bridge_env.held_by_bridges() == 0


def test_recovery_never_touches_live_bridges_or_pro_private_queues(bridge_env):
    store = bridge_env.store()
    pro = queue_key("sq|host:1:abc|default")
    store.redis.rpush(pro, make_job(1))
    bridge_env.push("default", [make_job(i) for i in range(3)])
    store.bridges.register("alive", ["default"], ttl=30)
    store.queues.fetch_jobs("alive", ["default"], 2)
    assert store.bridges.recover_dead() == {}
    assert len(store.queues.inflight_jobs("alive", "default")) == 2
    assert store.redis.llen(pro) == 1


def deep(levels: int) -> bytes:
    return b'{"class":"HardJob","args":' + b"[" * levels + b"]" * levels + b"}"


def test_poison_payloads_go_to_the_dead_set_and_the_bridge_carries_on(bridge_env):
    port = free_port()
    garbage = random.Random(3).randbytes(5 * 1024 * 1024)
    poison = {  # payload: why it is not a job
        b"": "not JSON",
        b"{not json": "not JSON",
        b"[1,2]": "not a JSON object",
        json.dumps({"args": [1], "jid": "x" * 24}).encode(): "no class",
        json.dumps({"class": "HardJob", "args": "nope"}).encode(): "args is not an array",
        garbage: "not JSON",
        # json.loads raises RecursionError, which used to strand the whole batch in flight.
        deep(1000): "nested too deep",
        deep(100): "nested too deep",  # Ruby's JSON.parse refuses more than 100 levels
        b'{"class":"HardJob","args":[],"retry_count":"abc"}': "retry_count is not an integer"
        " of -1 or more",
        b'{"class":"HardJob","args":[],"retry_count":NaN}': "not JSON",
        b'{"class":"HardJob","args":[],"retry_queue":"\\ud800"}': "a name field is not valid UTF-8",
    }
    bridge_env.push("default", [*poison, make_job(1), deep(99)])
    with BridgeProcess(bridge_env, "--metrics-port", str(port), "--max-pending", "1000") as bridge:
        wait_for(lambda: bridge_env.broker_count("default") == 2, timeout=20)
        wait_for(lambda: bridge_env.redis.zcard(DEAD) == len(poison), timeout=10)
        assert bridge.alive()
        assert sorted(m for m, _ in bridge_env.store().dead.entries()) == sorted(
            poison_entry(raw, reason) for raw, reason in poison.items()
        )
        assert not any(bridge_env.store().queues.held_by_bridges().values())  # nothing stranded
        assert f"{1:024x}" in bridge_env.published_jids("default")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("gokiq_bridge_poison_total{")
        )
        assert counted == len(poison)
        assert 'reason="not JSON"' in metrics and 'reason="no class"' in metrics
        warnings = [line for line in bridge.log_lines() if line.get("reason")]
        assert len(warnings) == len(poison)
        assert all(line["queue"] == "default" for line in warnings)
        assert bridge.terminate() == 0
    assert bridge_env.held_by_bridges() == 0


def test_status_endpoints(bridge_env):
    port = free_port()
    bridge_env.push("default", [make_job(1, enqueued_at=time.time() - 60)])
    bridge_env.redis.zadd(RETRY, {make_job(2): time.time() + 3600})
    url = f"http://127.0.0.1:{port}"
    # --max-pending 0 with worker_concurrency 1: limit 2; the one job is published at once
    with BridgeProcess(bridge_env, "--metrics-port", str(port), "--queues", "default") as bridge:
        wait_for(lambda: _get(url + "/health") == (200, "ok\n"), timeout=20)
        wait_for(lambda: _get(url + "/ready")[0] == 200, timeout=10)
        wait_for(lambda: bridge_env.broker_count("default") == 1, timeout=10)
        metrics = _get(url + "/metrics")[1]
        for name in (
            "gokiq_bridge_jobs_moved_total",
            "gokiq_bridge_queue_size",
            "gokiq_bridge_queue_latency_seconds",
            "gokiq_bridge_inflight",
            "gokiq_bridge_paused",
            "gokiq_bridge_breaker_open",
            "gokiq_bridge_set_size",
        ):
            assert name in metrics
        wait_for(lambda: 'gokiq_bridge_set_size{set="retry"} 1.0' in _get(url + "/metrics")[1])
        assert bridge_env.redis.sismember(QUEUES, "default")
        assert bridge.terminate() == 0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_an_idle_bridge_blocks_and_takes_a_job_pushed_meanwhile_into_its_inflight_list(bridge_env):
    fetcher = ReliableFetcher(bridge_env.store(), "idle", ["default"])
    assert fetcher.wait(["default"], timeout=0.05) is None  # nothing came
    pusher = threading.Timer(0.3, bridge_env.push, ("default", [make_job(1)]))
    pusher.start()
    batch = fetcher.wait(["default"], timeout=30)
    pusher.join()
    assert batch is not None and batch.queue == "default"
    assert [job.jid for job in batch.jobs] == [json.loads(make_job(1))["jid"]]
    # Held exactly like a fetched job: in this bridge's in-flight list, out of the queue.
    assert bridge_env.store().queues.held_by_bridges() == {inflight_key("idle", "default"): 1}
    assert bridge_env.redis.llen(queue_key("default")) == 0


def test_a_redis_without_blmove_makes_the_idle_bridge_poll(tmp_path):
    server = start_redis(tmp_path / "redis", None, "--rename-command", "BLMOVE", "")
    try:
        env = Env(server, 0, tmp_path)
        bridge = Bridge(env.settings(queues="default"), store=env.store())
        assert bridge.step() == Bridge.IDLE_SLEEP  # refused: falls back to polling, once
        assert not bridge.blocking_wait
        env.push("default", [make_job(2)])
        assert bridge.step() == 0.0  # the poll still fetches
        assert env.held_by_bridges() == 0 and env.broker_count("default") == 1
    finally:
        server.process.kill()
        server.process.wait(10)
