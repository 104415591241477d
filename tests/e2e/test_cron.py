"""sidekiq-cron under gokiq: the app's periodic job is enqueued once a minute with no Sidekiq.

The example app defines `example_minute_tick` (config/initializers/cron.rb): CronTickJob every
minute, with the time of its enqueue as argument, so each run says which minute's tick it is.
Every sidecar runs sidekiq-cron's own poller; the gem's de-duplication (a ZADD on
`cron_job:<name>:enqueued`) decides which poller enqueues a tick. Checked here with two
sidecars (the second in Puma cluster mode, two workers, still one poller) and two bridges,
then with a Ruby `sidekiq` running sidekiq-cron beside them on a queue nobody uses, as during a
migration, and through the gem's own Ruby API and Web UI tab. Takes about 7 minutes: the cron
line's unit is the minute. The gem's poll interval is shortened to ~2 s (its own option), so
the pollers really do race for each tick.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import datetime

import pytest

from ..conftest import wait_for
from .conftest import Stack

pytestmark = pytest.mark.e2e

CRON_JOB = "example_minute_tick"
STACK_ENV = {"GOKIQ_EXAMPLE_CRON": "1", "GOKIQ_EXAMPLE_CRON_POLL_INTERVAL": "2"}
# A tick is enqueued within seconds of its minute's start and runs at once; reading the runs
# this long after a window's last minute has ended sees all of them, and any duplicate.
SETTLE = 20


@pytest.fixture(scope="module")
def cron(stack: Stack) -> Stack:
    loaded, cron_version = stack.api({"op": "sidekiq_version"}, {"op": "sidekiq_cron_version"})
    if cron_version is None:
        # config/application.rb loads Debian's sidekiq-cron 1.8 on Sidekiq 6 only (it needs
        # redis-rb, which Sidekiq 7 dropped); on 6 a missing gem is a failure, not a skip.
        assert not loaded["loaded"].startswith("6."), "the example app did not load sidekiq-cron"
        pytest.skip(f"the example app has no sidekiq-cron on Sidekiq {loaded['loaded']}")
    stack.add_sidecar("sidecar2", "--workers", "2", "--threads", "2:4").start()
    stack.add_bridge("bridge2").start()
    return stack


def runs_by_minute(stack: Stack) -> dict[int, list[str]]:
    """CronTickJob's runs, by the minute their tick was enqueued in: {minute: [jid, ...]}."""
    runs = defaultdict(list)
    for row in stack.job_runs("CronTickJob"):
        (enqueued_at,) = json.loads(row["args"])
        runs[int(enqueued_at // 60)].append(row["jid"])
    return dict(runs)


def next_whole_minutes(count: int) -> list[int]:
    first = int(time.time() // 60) + 1
    return list(range(first, first + count))


def sleep_past(minutes: list[int]) -> None:
    """Until SETTLE seconds after the last of `minutes` has ended."""
    time.sleep(max(0.0, (minutes[-1] + 1) * 60 + SETTLE - time.time()))


def assert_once_a_minute(stack: Stack, window: list[int]) -> dict[int, list[str]]:
    runs = runs_by_minute(stack)
    assert all(len(runs.get(m, [])) == 1 for m in window), f"a tick missed in {window}: {runs}"
    twice = {m: jids for m, jids in runs.items() if len(jids) > 1}
    assert not twice, f"ticks enqueued more than once: {twice}"
    return runs


def enqueue_time(text: str) -> float:
    """sidekiq-cron's LAST_ENQUEUE_TIME_FORMAT, as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").timestamp()


def poller_starts(service) -> list[dict]:
    return [e for e in service.json_lines() if e.get("msg") == "sidekiq-cron poller started"]


def test_two_sidecars_and_two_bridges_enqueue_each_minute_once(cron: Stack):
    sidecar2 = cron.services[3]
    # One poller per sidecar process, though the second boots the app in two Puma workers.
    wait_for(lambda: len([e for e in sidecar2.json_lines() if e.get("msg") == "booted"]) == 2, 60)
    assert len(poller_starts(cron.sidecar)) == 1
    assert len(poller_starts(sidecar2)) == 1
    assert poller_starts(cron.sidecar)[0]["poll_interval"] == 2

    window = next_whole_minutes(2)
    sleep_past(window)
    assert_once_a_minute(cron, window)


def test_a_ruby_sidekiq_with_sidekiq_cron_alongside_enqueues_no_tick_twice(cron: Stack):
    sidekiq = cron.add_ruby_sidekiq("sidekiq", "-q", "nobody_uses_this", "-c", "2").start()
    window = next_whole_minutes(2)
    sleep_past(window)
    assert sidekiq.alive()
    runs = assert_once_a_minute(cron, window)

    # What sidekiq-cron's Ruby API says happened: one jid per tick, the runs' jids.
    job = cron.api1({"op": "cron_job", "name": CRON_JOB})
    assert job["status"] == "enabled"
    history = job["jid_history"]
    assert sorted(e["jid"] for e in history) == sorted(j for jids in runs.values() for j in jids)
    history_minutes = [int(enqueue_time(e["enqueued"]) // 60) for e in history]
    assert len(set(history_minutes)) == len(history)
    # last_enqueue_time is the latest tick's enqueue (whole seconds), just before its run's
    # argument (the time the gem built the job's arguments).
    last_minute = max(runs)
    last_run = cron.job_runs("CronTickJob", runs[last_minute])[0]
    (enqueued_at,) = json.loads(last_run["args"])
    assert int(job["last_enqueue_time"]) // 60 == last_minute
    assert job["last_enqueue_time"] <= enqueued_at < job["last_enqueue_time"] + 2
    assert history[0]["jid"] == last_run["jid"]  # newest first


def test_of_many_pollers_one_claims_a_tick(cron: Stack):
    """The de-duplication everything above relies on, forced: 8 pollers, one tick."""
    assert cron.api1({"op": "cron_claims", "pollers": 8}) == 1


def test_disabling_the_job_in_the_web_ui_stops_it(cron: Stack):
    page = cron.api1({"op": "web", "method": "GET", "path": "/cron"})
    assert page["status"] == 200
    last = cron.api1({"op": "cron_job", "name": CRON_JOB})["last_enqueue_time"]
    # The Cron tab lists the job with its last enqueue time.
    assert CRON_JOB in page["body"]
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) in page["body"]

    done = cron.api1({"op": "web", "method": "POST", "path": f"/cron/{CRON_JOB}/disable"})
    assert done["status"] == 302
    assert cron.api1({"op": "cron_job", "name": CRON_JOB})["status"] == "disabled"
    wait_for(cron.idle, timeout=60, interval=1)  # a tick enqueued just before has run
    before = runs_by_minute(cron)
    window = next_whole_minutes(1)
    sleep_past(window)
    assert runs_by_minute(cron) == before
    page = cron.api1({"op": "web", "method": "GET", "path": "/cron"})
    assert f"/cron/{CRON_JOB}/enable" in page["body"]  # shown as disabled: an Enable button
