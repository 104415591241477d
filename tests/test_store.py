"""The Redis side of the Sidekiq model against a real redis-server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from datetime import UTC, datetime

import pytest
import redis

from gokiq_celery.settings import load_settings
from gokiq_celery.sidekiq import Job, SidekiqStore, redis_client
from gokiq_celery.sidekiq.keys import DELIVERY_DEADLINES, DELIVERY_HOLDERS, WORKERS

from .conftest import start_redis


def make(jid: str, **fields) -> Job:
    return Job.build({"class": "HardJob", "args": [], "jid": jid, "queue": "default", **fields})


def test_push_is_fifo_and_registers_the_queue(redis_client):
    store = SidekiqStore(redis_client)
    store.queues.push("critical", make("a").text, make("b").text)
    store.queues.push("critical", make("c").text)
    assert store.queues.names() == ["critical"]
    assert Job.parse(store.queues.oldest("critical")).jid == "a"
    assert [Job.parse(j).jid for j in reversed(store.queues.jobs("critical"))] == ["a", "b", "c"]


def test_requeue_puts_the_exact_bytes_at_the_tail(redis_client):
    store = SidekiqStore(redis_client)
    store.queues.push("default", make("waiting").text)
    store.queues.requeue("default", b'{"class":"X",  "args":[]}')
    assert store.queues.oldest("default") == b'{"class":"X",  "args":[]}'
    assert store.queues.size("default") == 2


def test_dead_set_trims_like_sidekiq(redis_client):
    store = SidekiqStore(redis_client, dead_max_jobs=3, dead_timeout_in_seconds=100)
    now = time.time()
    store.dead.add(make("old").text, now=now - 200)
    for n in range(4):
        store.dead.add(make(f"j{n}").text, now=now + n)
    # at most max - 1 entries survive, and the one older than the timeout went first
    assert [Job.parse(raw).jid for raw, _ in store.dead.entries()] == ["j2", "j3"]


def test_dead_set_keeps_unparseable_payloads_verbatim(redis_client):
    store = SidekiqStore(redis_client)
    store.dead.add(b"{not json", now=1795415930.8556859)
    assert store.dead.entries() == [(b"{not json", 1795415930.8556859)]


def test_retry_and_schedule_scores_are_float_seconds(redis_client):
    store = SidekiqStore(redis_client)
    store.scheduled.schedule_retry(make("r"), 1795419503.1287122)
    store.scheduled.schedule(make("s"), 1795419504.5)
    assert store.scheduled.retry_set()[0][1] == 1795419503.1287122
    assert store.scheduled.scheduled_set()[0][1] == 1795419504.5


def test_stats_totals_and_daily_keys(redis_client):
    store = SidekiqStore(redis_client)
    now = time.time()
    store.ledger.settle([], processed=3, failed=1, now=now)
    store.ledger.settle([], processed=1, now=now)
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    assert store.stats.counts() == {"processed": 4, "failed": 1}
    assert redis_client.get(f"stat:processed:{day}") == b"4"
    assert 157_679_000 < redis_client.ttl(f"stat:failed:{day}") <= 157_680_000
    assert redis_client.ttl("stat:processed") == -1


def test_delivery_ledger_claim_settle_and_overdue(redis_client):
    store = SidekiqStore(redis_client)
    now = time.time()
    store.ledger.record(
        [("t1", "default", '{"class":"A","args":[]}'), ("t2", "low", '{"class":"B","args":[]}')],
        deadline=now + 10,
    )
    assert store.ledger.claim("t1", now + 600, "w1")
    assert not store.ledger.claim("unknown", now + 600, "w1")
    store.ledger.extend(["t1", "t2"], now + 300)  # never shortens t1's claim
    assert redis_client.zscore("gokiq:deliveries:due", "t1") == pytest.approx(now + 600)
    assert redis_client.zscore("gokiq:deliveries:due", "t2") == pytest.approx(now + 300)
    # Overdue: t2 only. Two bridges asking at once: exactly one takes it, under a new token.
    first = store.ledger.take_overdue(now + 400, ["n1", "n2"], now + 1000)
    second = store.ledger.take_overdue(now + 400, ["m1"], now + 1000)
    assert first == [("n1", "low", '{"class":"B","args":[]}')] and second == []
    assert store.ledger.tokens() == ["n1", "t1"]
    assert not store.ledger.claim("t2", now + 600, "w1")  # the old message is stale
    retry = make("a", retry_count=0)
    store.ledger.fail_into_retry_set("t1", retry, now + 20)  # t1's run failed: a retry in 20 s
    store.ledger.settle(["n1"])
    assert store.ledger.tokens() == [] and store.ledger.pending() == 0
    assert redis_client.hkeys(DELIVERY_HOLDERS) == []  # t1's claimer forgotten with it
    assert store.scheduled.retry_set() == [(retry.text.encode(), pytest.approx(now + 20))]
    assert store.stats.counts() == {"processed": 1, "failed": 1}


def test_a_retry_is_claimed_once_by_its_countdown_or_the_poller(redis_client):
    """Whoever removes the retry set's exact member first has the job; a countdown's claim
    enters its token in the ledger, held by its worker, in the same script."""
    store = SidekiqStore(redis_client)
    now = time.time()
    first, second = make("first", retry_count=0), make("second", retry_count=0)
    store.scheduled.schedule_retry(first, now - 1)
    store.scheduled.schedule_retry(second, now - 1)
    # The countdown first: the poller finds nothing, a second claim (another message) is stale.
    assert store.ledger.claim_retry(first.text, "c1", "low", now + 600, "w1")
    assert not store.ledger.claim_retry(first.text, "c2", "low", now + 600, "w2")
    assert store.scheduled.take_due("retry", "b1", now, 10) == [second.text.encode()]
    # The poller first: the countdown's claim fails and enters nothing.
    assert not store.ledger.claim_retry(second.text, "c3", "default", now + 600, "w1")
    assert store.ledger.tokens() == ["c1"]
    assert redis_client.hget("gokiq:deliveries", "c1") == b"3:low" + first.text.encode()
    assert redis_client.hget(DELIVERY_HOLDERS, "c1") == b"w1"
    assert redis_client.zscore(DELIVERY_DEADLINES, "c1") == pytest.approx(now + 600)
    assert redis_client.zscore(WORKERS, "w1") == pytest.approx(now, abs=5)
    # Its reply lost and the call sent again: the same claimer still has it.
    assert store.ledger.claim_retry(first.text, "c1", "low", now + 600, "w1")


def test_a_dead_worker_process_s_deliveries_are_handed_back_at_once(redis_client):
    """Claimed by a process silent for WORKER_TTL, or unclaimed and published before it died
    (maybe in its prefetch): due now. Claimed by a live process, published after the death, or
    a countdown retry not yet due: untouched."""
    store = SidekiqStore(redis_client)
    now = time.time()
    entries = [(token, "default", make(token).text) for token in ("run", "busy", "new", "eta")]
    store.ledger.record(entries, deadline=now - 100 + 300)  # published 100 s ago
    store.ledger.extend(["eta"], now + 200 + 300)  # a countdown retry due in 200 s
    assert store.ledger.claim("run", now + 600, "dead")
    assert store.ledger.claim("busy", now + 600, "alive")
    redis_client.zadd(WORKERS, {"dead": now - 60})  # its last sign of life
    store.ledger.record([("later", "default", make("later").text)], deadline=now + 300)

    assert store.ledger.recover_dead_workers(delivery_timeout=300, now=now) == (2, ["dead"])
    taken = store.ledger.take_overdue(now, ["n1", "n2", "n3"], now + 30)
    assert sorted(Job.parse(payload).jid for _, _, payload in taken) == ["new", "run"]
    assert store.ledger.recover_dead_workers(delivery_timeout=300, now=now) == (0, [])
    assert redis_client.zscore(DELIVERY_DEADLINES, "busy") == pytest.approx(now + 600)
    assert redis_client.zscore(DELIVERY_DEADLINES, "eta") == pytest.approx(now + 500)
    assert redis_client.zscore(DELIVERY_DEADLINES, "later") == pytest.approx(now + 300)


def test_ledger_entries_keep_any_queue_name_and_payload_exact(redis_client):
    store = SidekiqStore(redis_client)
    odd = [("t1", "q:1\nweird", '{"class":"A","args":["é\\n"]}'), ("t2", "été", '{"args":[]}')]
    store.ledger.record(odd, deadline=1.0)
    taken = store.ledger.take_overdue(2.0, ["n1", "n2"], deadline=10.0)
    assert sorted((q, p) for _, q, p in taken) == sorted((q, p) for _, q, p in odd)


def test_a_stalled_redis_raises_instead_of_hanging(monkeypatch):
    """Every process's client (bridge, worker) times out on a Redis that accepts and never
    answers, as a stalled or half-dead server does."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        monkeypatch.setattr(redis_client, "SOCKET_TIMEOUT", 0.5)
        store = SidekiqStore.from_settings(load_settings(redis_url=f"redis://127.0.0.1:{port}/0"))
        with pytest.raises(redis.TimeoutError):
            store.redis.ping()


def test_a_command_caught_in_a_redis_restart_completes_once_redis_is_back(tmp_path):
    """Redis closes every connection when it restarts and refuses new ones until it is up: the
    client reconnects and sends the command again instead of failing the job's step."""
    server = start_redis(tmp_path / "redis")
    store = SidekiqStore.from_settings(load_settings(redis_url=server.url(0)))
    try:
        store.redis.ping()  # a pooled connection, cut by the restart
        server.process.terminate()
        server.process.wait(10)
        restart = threading.Timer(4, lambda: start_redis(server.dir, server.port))
        restart.start()
        store.queues.push("default", make("during-the-restart").text)
        restart.join()
        assert store.queues.size("default") == 1
    finally:
        stop = redis.Redis(port=server.port)
        with contextlib.suppress(redis.RedisError):
            stop.shutdown(nosave=True)
