"""Recovery fast enough to count: after a crash or an outage every job that was in flight runs
within 60 s, with the deadlines at their defaults (job_timeout 600 s, delivery_timeout 300 s),
so that nothing waits for them.

Each test prints its figures: jobs, runs, lost, duplicated, and recovery seconds (from the fault
until the last of its jobs first ran).
"""

from __future__ import annotations

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


def fault_figures(stack: Stack, jids: list[str], fault_at: float, what: str, record_property):
    """Wait (generously) for every job, then check the bound; returns first-run times."""
    runs = wait_all_ran(stack, jids, timeout=BOUND + 120, stall=BOUND + 60)
    first: dict[str, float] = {}
    for row in stack.job_runs("HardJob", jids):
        first[row["jid"]] = min(first.get(row["jid"], row["created_at"]), row["created_at"])
    recovery = max(first.values()) - fault_at
    duplicated = sum(1 for count in runs.values() if count > 1)
    lost = len(set(jids) - set(runs))
    figures = {
        "jobs": len(jids),
        "runs": sum(runs.values()),
        "lost": lost,
        "duplicated": duplicated,
        "recovery_s": round(recovery, 1),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"{what}: {figures}")
    assert lost == 0
    assert recovery <= BOUND, f"{what}: the last job ran {recovery:.0f}s after the fault"
    return first


def test_worker_process_group_killed_mid_load(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 3000, "kill-group")
    wait_for(lambda: done_count(stack, set(jids)) >= 600, timeout=120, interval=0.1)
    killed = time.time()
    stack.worker.kill9_group()
    time.sleep(1)
    stack.worker.start()
    fault_figures(stack, jids, killed, "SIGKILL worker group", record_property)


def test_redis_restart_mid_drain(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 1000, "redis-restart")
    wait_for(lambda: done_count(stack, set(jids)) >= 300, timeout=120, interval=0.1)
    stopped = time.time()
    back = stack.restart_redis(down=3)
    first = fault_figures(stack, jids, stopped, "Redis restart", record_property)
    resumed = min((at for at in first.values() if at >= back), default=back) - back
    record_property("resume_s", round(resumed, 1))
    print(f"Redis restart: jobs ran again {resumed:.1f}s after Redis was back")
    assert resumed <= RESUME_BOUND
    assert all(service.alive() for service in stack.services)


def test_sidecar_killed_mid_load(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 1500, "kill-sidecar")
    wait_for(lambda: done_count(stack, set(jids)) >= 300, timeout=120, interval=0.1)
    killed = time.time()
    stack.sidecar.kill9()
    time.sleep(1)
    stack.sidecar.start()
    fault_figures(stack, jids, killed, "SIGKILL sidecar", record_property)
    assert stack.api1({"op": "dead"}) == [] and stack.api1({"op": "stats"})["retry_size"] == 0
