"""Crashes and outages under load: nothing is lost, no retry is spent on gokiq's own trouble.

Real processes again (see conftest.py). A dead bridge's in-flight jobs are recovered by a live
bridge once its heartbeat expires; the defaults (30 s heartbeat, 30 s recovery interval) are
shortened here so the test does not wait a minute for it.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from gokiq_celery.sidekiq.version import SidekiqVersion

from ..conftest import sidekiq_processes, wait_for
from .conftest import Stack, metric_value

pytestmark = pytest.mark.e2e

STACK_ENV = {
    "GOKIQ_BRIDGE_HEARTBEAT_TTL": "5",
    "GOKIQ_BRIDGE_RECOVERY_INTERVAL": "2",
    "GOKIQ_SIDEKIQ_HEARTBEAT": "1",  # the worker's beat on the Busy page (default 10 s)
}


def done_count(stack: Stack, jids: set[str]) -> int:
    return sum(1 for line in stack.sidecar_done() if line.get("jid") in jids)


def push_hard_jobs(stack: Stack, n: int, tag: str) -> list[str]:
    [jids] = stack.api(
        {"op": "push_bulk", "class": "HardJob", "args": [[tag, i] for i in range(n)]}
    )
    assert len(set(jids)) == n
    return jids


def wait_all_ran(stack: Stack, jids: list[str], timeout: float, stall: float = 45) -> Counter:
    """Wait until every jid has a JobRun row; return runs per jid. Fails after `timeout`, or
    once no new job has run for `stall` seconds, saying where the missing jobs are (a Sidekiq
    queue, a bridge's in-flight list, the broker's queues or its unacked hash)."""
    wanted = set(jids)
    deadline = time.monotonic() + timeout
    last_count, last_progress = -1, time.monotonic()
    while True:
        runs = Counter(r["jid"] for r in stack.job_runs("HardJob", None) if r["jid"] in wanted)
        if len(runs) == len(wanted):
            return runs
        now = time.monotonic()
        if len(runs) != last_count:
            last_count, last_progress = len(runs), now
        if now > deadline or now - last_progress > stall:
            missing = wanted - set(runs)
            pytest.fail(
                f"{len(missing)} of {len(wanted)} jobs never ran (no progress for "
                f"{now - last_progress:.0f}s); where they are: {locate(stack, missing)}"
            )
        time.sleep(2)


def locate(stack: Stack, jids: set[str]) -> dict[str, int]:
    """Where jobs are: every list, hash, set and sorted set in Sidekiq's db and the broker's
    db, plus the sidecar's and the worker's log lines that name them."""
    found: Counter = Counter()
    for label, r in (("sidekiq", stack.sidekiq_redis), ("broker", stack.broker_redis)):
        for key in r.scan_iter():
            kind = r.type(key)
            if kind == b"list":
                values = r.lrange(key, 0, -1)
            elif kind == b"hash":
                values = r.hvals(key)
            elif kind == b"zset":
                values = r.zrange(key, 0, -1)
            elif kind == b"set":
                values = r.smembers(key)
            else:
                values = [r.get(key)] if kind == b"string" else []
            for value in values:
                text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                hits = sum(1 for jid in jids if jid in text)
                if hits:
                    found[f"{label}:{key.decode(errors='replace')}"] += hits
    for service in (stack.sidecar, stack.worker, stack.bridge):
        for line in service.lines():
            hits = sum(1 for jid in jids if jid in line)
            if hits:
                found[f"{service.name} log lines"] += hits
    return dict(found)


def assert_at_least_once(runs: Counter, n: int, record_property, what: str) -> None:
    duplicates = {jid: count for jid, count in runs.items() if count > 1}
    record_property("duplicates", len(duplicates))
    print(f"{what}: all {n} jobs ran; {len(duplicates)} ran more than once")
    assert len(runs) == n and all(count >= 1 for count in runs.values())
    # A duplicate can only be a job in flight at a kill (bounded by the bridge's batch and
    # pending limit plus the worker's reserved and running jobs).
    assert len(duplicates) <= 200, duplicates


def test_kill9_bridge_twice_mid_load_loses_nothing(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 1000, "kill9-bridge")
    wanted = set(jids)
    for done in (200, 500):
        wait_for(lambda d=done: done_count(stack, wanted) >= d, timeout=60, interval=0.1)
        stack.bridge.kill9()
        time.sleep(0.5)
        stack.bridge.start()
    runs = wait_all_ran(stack, jids, timeout=120)
    assert_at_least_once(runs, 1000, record_property, "kill -9 bridge twice")


def test_kill9_bridge_then_worker_mid_load_loses_nothing(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 2000, "kill9")
    wanted = set(jids)
    wait_for(lambda: done_count(stack, wanted) >= 300, timeout=60, interval=0.2)
    stack.bridge.kill9()
    time.sleep(1)
    stack.bridge.start()

    wait_for(lambda: done_count(stack, wanted) >= 1000, timeout=90, interval=0.2)
    stack.worker.kill9()
    time.sleep(1)
    stack.worker.start()

    runs = wait_all_ran(stack, jids, timeout=180)
    assert_at_least_once(runs, 2000, record_property, "kill -9 bridge, then worker")
    assert stack.api1({"op": "dead"}) == []


def test_sidecar_outage_pauses_without_spending_retries(stack: Stack):
    stats0 = stack.api1({"op": "stats"})
    jids = push_hard_jobs(stack, 1500, "outage")
    wanted = set(jids)
    wait_for(lambda: done_count(stack, wanted) >= 150, timeout=60, interval=0.2)
    stack.sidecar.kill9()  # a crash: requests in progress are cut, new ones refused
    stopped = time.monotonic()

    breaker_seen = paused_seen = worker_open_seen = False
    moved: list[tuple[float, float]] = []
    bad_payloads: list[bytes] = []
    while time.monotonic() - stopped < 20:
        bridge = stack.metrics(stack.bridge_url)
        breaker_seen |= metric_value(bridge, "gokiq_bridge_breaker_open") == 1
        paused_seen |= metric_value(bridge, "gokiq_bridge_paused", reason="breaker") == 1
        moved.append(
            (time.monotonic() - stopped, metric_value(bridge, "gokiq_bridge_jobs_moved_total"))
        )
        worker = stack.metrics(stack.worker_url)
        worker_open_seen |= metric_value(worker, "gokiq_worker_breaker_state") == 2
        for raw in stack.sidekiq_redis.lrange("queue:default", 0, 200):
            if b'"retry_count"' in raw or b'"error_class"' in raw:
                bad_payloads.append(raw)
        time.sleep(1)
    assert worker_open_seen, "the workers' breaker never opened"
    assert breaker_seen, "the bridge never saw the breaker open"
    assert paused_seen, "the bridge never paused for the breaker"
    late = [v for t, v in moved if t >= 8]
    assert late[-1] - late[0] <= 60, f"the bridge kept publishing while paused: {moved}"
    assert not bad_payloads, bad_payloads[:3]

    stack.sidecar.start()
    runs = wait_all_ran(stack, jids, timeout=120)
    assert all(n >= 1 for n in runs.values())
    stats1 = stack.api1({"op": "stats"})
    assert stats1["failed"] == stats0["failed"], "a job was counted as failed"
    assert stats1["retry_size"] == 0 and stats1["dead_size"] == 0
    fails = [
        line
        for line in stack.worker.json_lines()
        if line.get("jid") in wanted and str(line.get("msg", "")).startswith("fail")
    ]
    assert not fails, fails[:3]
    for raw in stack.sidekiq_redis.lrange("queue:default", 0, -1):
        assert b'"retry_count"' not in raw


def test_busy_page_shows_the_worker_and_its_stop_button_stops_it(stack: Stack):
    """Sidekiq's Web UI buttons act on the Celery worker: Stop is a warm shutdown."""
    jid = stack.api1({"op": "perform_async", "class": "SleepJob", "args": [5000]})

    def running() -> list:
        work = sidekiq_processes(stack.redis_url)["work"]
        return [entry for _identity, _tid, entry in work if entry["payload"]["jid"] == jid]

    [entry] = wait_for(running, timeout=30, message="the job never showed on the Busy page")
    assert (entry["queue"], entry["payload"]["class"]) == ("default", "SleepJob")
    # A worker SIGKILLed by an earlier test stays listed until its entry expires (60 s).
    processes = sidekiq_processes(stack.redis_url)["processes"]
    [process] = [p for p in processes if p["pid"] == stack.worker.pid]
    assert (process["tag"], process["concurrency"]) == ("gokiq", 20) and process["busy"] >= 1
    # Nothing configured: the worker learned the app's Sidekiq from its sidecar and wrote the
    # running jobs under the one name that version reads (`:workers` up to 6.4.1, `:work` after).
    assert "GOKIQ_SIDEKIQ_VERSION" not in stack.env
    loaded = SidekiqVersion.parse(stack.api1({"op": "sidekiq_version"})["loaded"])
    name, other = ("workers", "work") if loaded.release <= (6, 4, 1) else ("work", "workers")
    assert stack.sidekiq_redis.exists(f"{process['identity']}:{name}")
    assert not stack.sidekiq_redis.exists(f"{process['identity']}:{other}")

    sidekiq_processes(stack.redis_url, "stop")  # the Busy page's Stop button
    assert stack.worker.proc.wait(30) == 0
    assert jid in {line.get("jid") for line in stack.sidecar_done()}  # it finished its job
    identities = {p["identity"] for p in sidekiq_processes(stack.redis_url)["processes"]}
    assert process["identity"] not in identities
    stack.worker.start()


def test_a_retry_that_meets_its_timed_out_first_run_still_runs(stack: Stack):
    """The first run outlives job_timeout (15 s here) and fails later, unheard; its retry
    reaches the sidecar while that run still holds the jid (409). The job must run again."""
    jid = stack.api1({"op": "perform_async", "class": "SlowFlakyJob", "args": ["slow", 45_000]})
    stack.wait_runs([jid], "SlowFlakyJob", timeout=240)
    outcomes = [
        line.get("outcome") for line in stack.sidecar.json_lines() if line.get("jid") == jid
    ]
    assert "duplicate" in outcomes, outcomes  # the 409 this test is about did happen
    assert stack.api1({"op": "dead"}) == []
