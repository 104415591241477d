"""Every pending retry waits in Sidekiq's `retry` set, short ones (a Celery countdown) too: the
app's Sidekiq API sees it, Retry Now and Delete act on it, and a SIGKILLed worker's countdown
is taken over by the bridge's poller (RETRY_GRACE after the retry is due)."""

from __future__ import annotations

import uuid
from typing import Any

from gokiq_celery.sidekiq.scheduled import RETRY_GRACE

from ..conftest import wait_for
from .conftest import Stack

# FlakyJob's first retry follows Sidekiq's curve: 15 + rand(10) s, well within the countdown.
SHORT = 300


def flaky(stack: Stack) -> tuple[str, str]:
    """A FlakyJob that fails once; returns (jid, attempts key)."""
    key = f"retry-set-{uuid.uuid4().hex[:8]}"
    return stack.api1({"op": "perform_async", "class": "FlakyJob", "args": [key, 1]}), key


def waiting_retry(stack: Stack, jid: str) -> dict[str, Any]:
    """The job's entry in Sidekiq::RetrySet, once its first run has failed."""
    entries: list[dict[str, Any]] = []

    def listed() -> bool:
        nonlocal entries
        entries = stack.api1({"op": "retries", "jid": jid})
        return bool(entries)

    wait_for(listed, timeout=60, interval=0.5, message="the retry never showed in the RetrySet")
    [entry] = entries
    return entry


def attempts(stack: Stack, key: str) -> list[float]:
    return stack.api1({"op": "flaky_attempts", "key": key})


def wait_past(stack: Stack, entry: dict[str, Any]) -> None:
    """Until the retry's countdown and the poller would both have taken it, had it been there."""
    wait_for(
        lambda: stack.api1({"op": "now"}) > entry["score"] + RETRY_GRACE + 5,
        timeout=SHORT,
        interval=1.0,
    )
    wait_for(stack.idle, timeout=60, message="jobs still moving")


def test_a_short_retry_is_in_the_retry_set_and_retry_now_runs_it_once(stack: Stack):
    jid, key = flaky(stack)
    entry = waiting_retry(stack, jid)
    now = stack.api1({"op": "now"})
    assert entry["item"]["retry_count"] == 0 and entry["item"]["error_message"] == "flaky 1"
    assert now < entry["score"] <= now + SHORT  # a short retry: Celery's countdown holds it
    assert stack.api1({"op": "retry_entry", "jid": jid, "action": "retry"}) == jid
    [run] = stack.wait_runs([jid], "FlakyJob", timeout=60)
    assert run["note"] == "attempt 2" and run["created_at"] < entry["score"]
    wait_past(stack, entry)  # the countdown fires: stale, the job is not run again
    assert len(attempts(stack, key)) == 2
    assert len(stack.job_runs("FlakyJob", [jid])) == 1
    assert stack.api1({"op": "retries", "jid": jid}) == []


def test_deleting_a_short_retry_stops_it(stack: Stack):
    jid, key = flaky(stack)
    entry = waiting_retry(stack, jid)
    assert stack.api1({"op": "retry_entry", "jid": jid, "action": "delete"}) == jid
    wait_past(stack, entry)
    assert len(attempts(stack, key)) == 1 and stack.job_runs("FlakyJob", [jid]) == []
    assert stack.api1({"op": "retries", "jid": jid}) == []
    assert stack.api1({"op": "dead", "jid": jid}) == []


def test_a_sigkilled_worker_s_short_retry_still_runs_on_time(stack: Stack):
    """The countdown dies with the worker; the poller takes the entry once it is RETRY_GRACE
    late, and the job runs once (a countdown message the broker gives back later is stale)."""
    jid, key = flaky(stack)
    entry = waiting_retry(stack, jid)
    stack.worker.kill9_group()
    stack.worker.start()
    [run] = stack.wait_runs([jid], "FlakyJob", timeout=SHORT)
    late = run["created_at"] - entry["score"]
    print(f"SIGKILLed worker's retry ran {late:.1f}s after it was due")
    assert run["created_at"] >= entry["score"]  # not early: Sidekiq's delay holds
    assert late <= RETRY_GRACE + 30  # the poller's grace, not the ledger's deadline (minutes)
    # Not stack.idle: the broker holds the dead worker's countdown unacked until its visibility
    # timeout; once given back, it is stale.
    wait_for(lambda: stack.api1({"op": "now"}) > run["created_at"] + 5, interval=1.0)
    assert len(attempts(stack, key)) == 2 and len(stack.job_runs("FlakyJob", [jid])) == 1
    assert stack.api1({"op": "retries", "jid": jid}) == []
