"""What a Rails app sees when gokiq runs its Sidekiq jobs: the whole stack as real processes.

Jobs are enqueued with the example app's real Sidekiq client (`stack.api`); outcomes are read
from the app's database (JobRun rows), Sidekiq's own Ruby API (DeadSet, RetrySet, Stats) and
the sidecar's per-job log. Sidekiq's real retry delays (15 s + jitter, 16 s + jitter, ...)
cannot be shortened, so every job that needs retries is enqueued once, at the start of the
module (`slow`), and the tests that check them run while they are in progress.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest

from gokiq_celery.sidekiq.retry import decode_backtrace

from ..conftest import wait_for
from .conftest import Stack

pytestmark = pytest.mark.e2e

SLACK = 2.5  # seconds: ETA delivery + HTTP + Rails run + sqlite write, on a busy 2-core box


def sidecar_runs(stack: Stack, jid: str) -> list[dict[str, Any]]:
    """The sidecar's "job done" log lines for one jid, in order (one per run)."""
    return [line for line in stack.sidecar_done() if line.get("jid") == jid]


def ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"]).timestamp()


def dead_entry(stack: Stack, jid: str) -> dict[str, Any] | None:
    entries = stack.api1({"op": "dead", "jid": jid})
    return entries[0] if entries else None


def assert_alive(stack: Stack) -> None:
    for service in stack.services:
        assert service.alive(), f"{service.name} died:\n{service.tail()}"


@pytest.fixture(scope="module", autouse=True)
def slow(stack: Stack) -> dict[str, Any]:
    """Jobs whose retries take tens of seconds, started before any test runs."""
    ops = [
        {"op": "now"},
        {"op": "perform_async", "class": "FlakyJob", "args": ["flaky-e2e", 2]},
        {"op": "perform_async", "class": "FailJob", "args": [1, "x"]},
        {"op": "perform_async", "class": "RetryInJob", "args": ["again"]},
        {"op": "perform_async", "class": "RetryInJob", "args": ["kill"]},
        {"op": "perform_async", "class": "RetryInJob", "args": ["discard"]},
        {"op": "push", "item": {"class": "NoSuchJob", "args": [1], "retry": 1}},
        {"op": "stats"},
    ]
    now, flaky, fail, again, kill, discard, unknown_retry, stats = stack.api(*ops)
    return {
        "t0": now,
        "flaky": flaky,
        "fail": fail,
        "again": again,
        "kill": kill,
        "discard": discard,
        "unknown_retry": unknown_retry,
        "stats": stats,
    }


def test_arguments_round_trip_exactly(stack: Stack):
    big = "é☃𝄞" + "x" * 100_000
    cases = [
        [1, "two", {"three": 3}],
        ["ünïcödé ✓ 日本語 🎉", '\u0000\t\n"quotes" and \\backslash', ""],
        [{"a": {"b": {"c": [1, {"d": None, "e": True, "f": False}]}}, "list": [[], {}, [[1]]]}],
        [0.1, 1.5, -2.25, 1e-07, 123456789.123456, 2**62, -(2**31), 0, 1.7976931348623157e308],
        [big],
    ]
    jids = stack.api(*({"op": "perform_async", "class": "HardJob", "args": a} for a in cases))
    rows = stack.wait_runs(jids, "HardJob", timeout=30)
    by_jid = {r["jid"]: r for r in rows}
    for jid, args in zip(jids, cases, strict=True):
        assert json.loads(by_jid[jid]["args"]) == args
        assert by_jid[jid]["middleware"] is True, "the app's server middleware did not wrap it"
    assert len(rows) == len(cases), "a job ran more than once"


def test_info_logs_say_what_happened_to_each_job_without_its_arguments(stack: Stack):
    secret = "personal-data-7f3a"
    ok, failing = stack.api(
        {"op": "perform_async", "class": "HardJob", "args": [secret, {"email": secret}]},
        {"op": "push", "item": {"class": "NoSuchJob", "args": [secret], "retry": False}},
    )
    stack.wait_runs([ok], "HardJob", timeout=30)
    wait_for(lambda: sidecar_runs(stack, failing), timeout=30)

    def job_lines() -> list[dict[str, Any]]:
        return [line for line in stack.worker.json_lines() if line.get("jid") in (ok, failing)]

    wait_for(lambda: len(job_lines()) >= 4, timeout=30, message="no start/done lines")
    by_msg = {(line["jid"], line["msg"].split(":")[0]): line for line in job_lines()}
    assert by_msg[(ok, "start")]["class"] == "HardJob" and by_msg[(ok, "start")]["queue"]
    assert by_msg[(ok, "done")]["elapsed"] >= 0
    assert by_msg[(failing, "fail")]["outcome"] == "dropped"
    for service in stack.services:  # every process, every line
        assert not [line for line in service.lines() if secret in line], service.name


def test_current_attributes_travel_with_the_job(stack: Stack):
    jid = stack.api1({"op": "perform_async", "class": "HardJob", "args": ["cattr"], "user_id": 42})
    [row] = stack.wait_runs([jid], "HardJob", timeout=30)
    assert row["note"] == "user_id=42"


def test_thousand_jobs_each_run_once(stack: Stack):
    before = stack.api1({"op": "stats"})
    [jids] = stack.api(
        {"op": "push_bulk", "class": "HardJob", "args": [[i, f"bulk-{i}"] for i in range(1000)]}
    )
    assert len(set(jids)) == 1000
    rows = stack.wait_runs(jids, "HardJob", timeout=120)
    assert len(rows) == 1000, f"{len(rows) - 1000} duplicate runs"
    assert sorted(json.loads(r["args"])[0] for r in rows) == list(range(1000))
    # Counted when the workers settle the runs, in batches a few ms after the jobs finish.
    wait_for(lambda: stack.api1({"op": "stats"})["processed"] - before["processed"] >= 1000)


def test_jobs_on_other_queues_run(stack: Stack):
    jids = stack.api(
        {"op": "perform_async", "class": "HardJob", "args": ["q1"], "set": {"queue": "critical"}},
        {"op": "perform_async", "class": "HardJob", "args": ["q2"], "set": {"queue": "low"}},
    )
    stack.wait_runs(jids, "HardJob", timeout=30)
    queues = {line["jid"]: line["queue"] for line in stack.sidecar_done() if line["jid"] in jids}
    assert queues == {jids[0]: "critical", jids[1]: "low"}


def test_perform_in_runs_when_due(stack: Stack):
    jid, scheduled = stack.api(
        {"op": "perform_in", "class": "HardJob", "in": 2, "args": ["later"]},
        # Sidekiq's own view of the scheduled job: the score is when it is due.
        {"op": "scheduled"},
    )
    [entry] = [e for e in scheduled if e["jid"] == jid]
    due = entry["score"]
    [row] = stack.wait_runs([jid], "HardJob", timeout=30)
    assert due <= row["created_at"] <= due + 1.0, f"ran {row['created_at'] - due:+.3f}s from due"
    assert stack.api1({"op": "scheduled", "jid": jid}) == []


def test_activejob_with_globalid_and_kwargs(stack: Stack):
    jid = stack.api1(
        {
            "op": "perform_later",
            "class": "GreetJob",
            "args": [{"$person": "Ann"}],
            "kwargs": {"greeting": "Hello", "punctuation": "?"},
        }
    )
    [row] = stack.wait_runs([jid], "GreetJob", timeout=30)
    assert row["note"] == "Hello, Ann?"
    assert row["middleware"] is True
    [line] = sidecar_runs(stack, jid)
    assert line["class"] == "GreetJob" and line["outcome"] == "ok"


def test_not_json_goes_to_the_dead_set_and_nothing_crashes(stack: Stack):
    stack.push_raw("default", "{not json")
    wait_for(
        lambda: any(e["value"] == "{not json" for e in stack.api1({"op": "dead"})),
        timeout=30,
        interval=1,
        message="the payload never reached the dead set",
    )
    jid = stack.api1({"op": "perform_async", "class": "HardJob", "args": ["after poison"]})
    stack.wait_runs([jid], "HardJob", timeout=30)
    assert_alive(stack)


def test_unknown_and_forbidden_classes_follow_their_retry_field(stack: Stack):
    no_retry, kernel = stack.api(
        {"op": "push", "item": {"class": "NoSuchJob", "args": [], "retry": False}},
        {"op": "push", "item": {"class": "Kernel", "args": ["exit!"], "retry": 0}},
    )
    # retry: false -> dropped: no dead entry, only the death handlers (as Sidekiq does).
    [handler] = stack.wait_runs([no_retry], "death_handler", timeout=30)
    assert "NoSuchJob" in handler["note"]
    # retry: 0 -> straight to the dead set.
    wait_for(lambda: dead_entry(stack, kernel), timeout=30, interval=1, message="Kernel not dead")
    item = dead_entry(stack, kernel)["item"]
    assert item["retry_count"] == 0 and item["error_class"] and item["class"] == "Kernel"
    assert dead_entry(stack, no_retry) is None
    assert len(sidecar_runs(stack, kernel)) == 1
    assert_alive(stack)


def test_retry_false_leaves_no_trace_in_dead(stack: Stack):
    jid = stack.api1({"op": "perform_async", "class": "NoRetryJob", "args": [1]})
    [handler] = stack.wait_runs([jid], "death_handler", timeout=30)
    assert handler["note"] == "NoRetryJob RuntimeError: no retry"
    time.sleep(1)
    assert dead_entry(stack, jid) is None
    assert stack.api1({"op": "retries", "jid": jid}) == []
    assert len(sidecar_runs(stack, jid)) == 1


def test_retry_zero_goes_straight_to_dead(stack: Stack):
    jid = stack.api1({"op": "perform_async", "class": "RetryZeroJob", "args": [1]})
    wait_for(lambda: dead_entry(stack, jid), timeout=30, interval=1, message="not in dead set")
    item = dead_entry(stack, jid)["item"]
    assert item["retry_count"] == 0
    assert item["error_class"] == "RuntimeError" and item["error_message"] == "retry zero"
    assert isinstance(item["failed_at"], float) and "retried_at" not in item
    assert len(sidecar_runs(stack, jid)) == 1
    stack.wait_runs([jid], "death_handler", timeout=10)


def test_dead_false_never_reaches_dead(stack: Stack):
    jid = stack.api1({"op": "perform_async", "class": "NoDeadJob", "args": [1]})
    [handler] = stack.wait_runs([jid], "death_handler", timeout=30)
    assert handler["note"] == "NoDeadJob RuntimeError: no dead"
    time.sleep(1)
    assert dead_entry(stack, jid) is None
    assert len(sidecar_runs(stack, jid)) == 1


def test_sidekiq_retry_in_kill_and_discard(stack: Stack, slow):
    wait_for(lambda: dead_entry(stack, slow["kill"]), timeout=30, interval=1, message="no kill")
    item = dead_entry(stack, slow["kill"])["item"]
    assert item["retry_count"] == 0 and item["error_message"] == "kill"
    assert len(sidecar_runs(stack, slow["kill"])) == 1
    [run] = sidecar_runs(stack, slow["discard"])
    assert run["outcome"] == "failed"
    assert dead_entry(stack, slow["discard"]) is None
    assert stack.api1({"op": "retries", "jid": slow["discard"]}) == []


def test_sidekiq_retry_in_delay_is_honoured(stack: Stack, slow):
    # RetryInJob says 5 s; Sidekiq adds rand(10) * (count + 1). The default curve would be
    # 15 s + jitter for the first retry, so a first gap under 15 s proves the custom delay.
    runs = wait_for(
        lambda: (r := sidecar_runs(stack, slow["again"])) and len(r) >= 3 and r,
        timeout=5 + 9 + 5 + 18 + 3 * SLACK + 10,
        interval=1,
        message="RetryInJob was not retried twice",
    )
    gap1, gap2 = ts(runs[1]) - ts(runs[0]), ts(runs[2]) - ts(runs[1])
    assert 5 <= gap1 <= 5 + 9 + SLACK, gap1
    assert 5 <= gap2 <= 5 + 18 + SLACK, gap2
    assert all(r["outcome"] == "failed" for r in runs)


def test_flaky_job_fails_twice_then_succeeds(stack: Stack, slow):
    # Sidekiq's curve: 15 s + rand(10), then 16 s + rand(10) * 2: at most ~58 s in all.
    [row] = stack.wait_runs([slow["flaky"]], "FlakyJob", timeout=24 + 34 + 3 * SLACK + 15)
    assert row["note"] == "attempt 3" and row["middleware"] is True
    attempts = stack.api1({"op": "flaky_attempts", "key": "flaky-e2e"})
    assert len(attempts) == 3
    gap1, gap2 = attempts[1] - attempts[0], attempts[2] - attempts[1]
    assert 15 <= gap1 <= 15 + 9 + SLACK, gap1
    assert 16 <= gap2 <= 16 + 18 + SLACK, gap2
    assert dead_entry(stack, slow["flaky"]) is None
    runs = sidecar_runs(stack, slow["flaky"])
    assert [r["outcome"] for r in runs] == ["failed", "failed", "ok"]


def test_exhausted_job_is_dead_with_sidekiq_fields_and_can_be_retried(stack: Stack, slow):
    jid = slow["fail"]
    wait_for(
        lambda: dead_entry(stack, jid),
        timeout=24 + 34 + 3 * SLACK + 15,
        interval=1,
        message="FailJob never reached the dead set",
    )
    entry = dead_entry(stack, jid)
    item = entry["item"]
    assert item["class"] == "FailJob" and item["args"] == [1, "x"] and item["jid"] == jid
    assert item["retry"] == 2 and item["retry_count"] == 2 and item["queue"] == "default"
    assert item["error_class"] == "ArgumentError" and item["error_message"] == "boom"
    assert isinstance(item["failed_at"], float) and isinstance(item["retried_at"], float)
    assert item["failed_at"] < item["retried_at"] <= entry["score"]
    backtrace = decode_backtrace(item["error_backtrace"])
    assert 1 <= len(backtrace) <= 5 and "fail_job.rb" in backtrace[0]
    assert len(sidecar_runs(stack, jid)) == 3
    [hook] = stack.wait_runs([jid], "FailJob.exhausted", timeout=10)
    assert hook["note"] == "ArgumentError: boom"
    stack.wait_runs([jid], "death_handler", timeout=10)

    # Sidekiq's "Retry now" (DeadSet entry#retry): back on its queue, runs once more, dead again.
    assert stack.api1({"op": "retry_dead", "jid": jid}) == jid
    wait_for(lambda: len(sidecar_runs(stack, jid)) == 4, timeout=30, message="not run again")
    wait_for(
        lambda: len(stack.job_runs("FailJob.exhausted", [jid])) == 2,
        timeout=30,
        interval=1,
        message="the re-run did not exhaust again",
    )
    again = dead_entry(stack, jid)["item"]
    assert again["retry_count"] == 2


def test_unknown_class_with_retry_is_retried_then_dead(stack: Stack, slow):
    jid = slow["unknown_retry"]
    wait_for(
        lambda: dead_entry(stack, jid),
        timeout=24 + SLACK + 30,
        interval=1,
        message="unknown class with retry: 1 never reached the dead set",
    )
    item = dead_entry(stack, jid)["item"]
    assert item["retry_count"] == 1 and item["error_class"]
    runs = sidecar_runs(stack, jid)
    assert len(runs) == 2 and all(r["outcome"] == "invalid_class" for r in runs)


def test_stats_and_first_dead_entry_retry(stack: Stack, slow):
    """Sidekiq::Stats agrees with what ran, and `DeadSet.new.first.retry` works as-is."""
    stats = stack.api1({"op": "stats"})
    assert stats["processed"] > slow["stats"]["processed"]
    assert stats["failed"] >= 2 + 3 + 1  # flaky twice, FailJob thrice, NoRetryJob once at least
    assert stats["dead_size"] >= 3
    first = stack.api1({"op": "dead"})[0]
    assert first["item"].get("class"), f"the oldest dead entry is not a job: {first}"
    runs = len(sidecar_runs(stack, first["jid"]))
    assert stack.api1({"op": "retry_dead"}) == first["jid"]
    wait_for(lambda: len(sidecar_runs(stack, first["jid"])) > runs, timeout=30)
    assert_alive(stack)
