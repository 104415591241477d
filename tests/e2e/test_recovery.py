"""Recovery fast enough to count: after a crash or an outage every job that was in flight runs
within 60 s, with the deadlines at their defaults (job_timeout 600 s, delivery_timeout 300 s),
so that nothing waits for them.

Each test prints its figures: jobs, runs, lost, duplicated, the jobs in flight at the fault (in
the delivery ledger or a bridge's in-flight list: handed towards Celery, not waiting in a
Sidekiq queue), recovery seconds (from the fault until the last of those first ran: the bound)
and drain seconds (until the last of all the test's jobs ran, which on a loaded machine is mostly
the time the backlog takes).
"""

from __future__ import annotations

import json
import time

import pytest

from ..conftest import wait_for
from .conftest import Stack
from .test_resilience import done_count, push_hard_jobs, wait_all_ran

pytestmark = pytest.mark.e2e

STACK_ENV = {"GOKIQ_JOB_TIMEOUT": "600", "GOKIQ_DELIVERY_TIMEOUT": "300"}
REDIS_ARGS = ("--appendonly", "yes")
BOUND = 60.0  # seconds from the fault until every job has run (issue 17)
RESUME_BOUND = 10.0  # seconds from Redis being back until jobs run again


def in_flight(stack: Stack) -> set[str]:
    """The jids of the jobs handed towards Celery: ledger entries and bridges' in-flight lists."""
    r = stack.sidekiq_redis
    payloads = []
    for entry in r.hvals("gokiq:deliveries"):  # "<byte length of queue>:<queue><payload>"
        length, rest = entry.split(b":", 1)
        payloads.append(rest[int(length) :])
    for key in r.scan_iter("gokiq:inflight:*"):
        payloads += r.lrange(key, 0, -1)
    return {json.loads(payload)["jid"] for payload in payloads}


def fault_figures(
    stack: Stack, jids: list[str], flying: set[str], fault_at: float, what: str, record_property
):
    """Wait (generously) for every job, then check the bound on the jobs that were in flight at
    the fault; returns first-run times."""
    runs = wait_all_ran(stack, jids, timeout=600, stall=BOUND + 60)
    first: dict[str, float] = {}
    for row in stack.job_runs("HardJob", jids):
        first[row["jid"]] = min(first.get(row["jid"], row["created_at"]), row["created_at"])
    flying &= set(jids)
    recovery = max((first[jid] for jid in flying), default=fault_at) - fault_at
    duplicated = sum(1 for count in runs.values() if count > 1)
    lost = len(set(jids) - set(runs))
    figures = {
        "jobs": len(jids),
        "runs": sum(runs.values()),
        "lost": lost,
        "duplicated": duplicated,
        "in_flight": len(flying),
        "recovery_s": round(recovery, 1),
        "drain_s": round(max(first.values()) - fault_at, 1),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"{what}: {figures}")
    assert lost == 0
    assert flying, f"{what}: no job was in flight at the fault"
    assert recovery <= BOUND, f"{what}: the last job in flight ran {recovery:.0f}s after the fault"
    return first


def crash_mid_load(
    stack: Stack, service, kill, jobs: int, done: int, what: str, record_property
) -> list[str]:
    """Push `jobs`, kill `service` once `done` have run, start it again 1 s later, and check
    the figures; returns the jids."""
    jids = push_hard_jobs(stack, jobs, what)
    wait_for(lambda: done_count(stack, set(jids)) >= done, timeout=120, interval=0.1)
    killed = time.time()
    kill()
    flying = in_flight(stack)
    time.sleep(1)
    service.start()
    fault_figures(stack, jids, flying, killed, what, record_property)
    return jids


def test_worker_process_group_killed_mid_load(stack: Stack, record_property):
    worker = stack.worker
    crash_mid_load(stack, worker, worker.kill9_group, 3000, 600, "SIGKILL worker", record_property)


def test_redis_restart_mid_drain(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 1000, "redis-restart")
    wait_for(lambda: done_count(stack, set(jids)) >= 300, timeout=120, interval=0.1)
    flying = in_flight(stack)
    stopped = time.time()
    back = stack.restart_redis(down=3)
    first = fault_figures(stack, jids, flying, stopped, "Redis restart", record_property)
    resumed = min((at for at in first.values() if at >= back), default=back) - back
    record_property("resume_s", round(resumed, 1))
    print(f"Redis restart: jobs ran again {resumed:.1f}s after Redis was back")
    assert resumed <= RESUME_BOUND
    assert all(service.alive() for service in stack.services)


def test_sidecar_killed_mid_load(stack: Stack, record_property):
    sidecar = stack.sidecar
    crash_mid_load(stack, sidecar, sidecar.kill9, 1500, 300, "SIGKILL sidecar", record_property)
    assert stack.api1({"op": "dead"}) == [] and stack.api1({"op": "stats"})["retry_size"] == 0
