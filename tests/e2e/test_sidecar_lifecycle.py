"""The sidecar as the Rails app's Sidekiq process: lifecycle hooks and the version it publishes.

The example app records each run of its `config.on(:startup)`, `:heartbeat`, `:quiet` and
`:shutdown` blocks as a line `<event> <pid>` in the file named by GOKIQ_EXAMPLE_LIFECYCLE_LOG.
The stack runs a job, the sidecar is stopped with SIGTERM and started again, and each of its
two processes must have run each hook exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gokiq_celery.sidekiq.keys import SIDEKIQ_VERSION_KEY

from ..conftest import wait_for
from .conftest import Stack, running

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lifecycle_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifecycle") / "lifecycle.log"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, lifecycle_log: Path) -> Iterator[Stack]:
    env = {"GOKIQ_EXAMPLE_LIFECYCLE_LOG": str(lifecycle_log)}
    with running(Stack(tmp_path_factory.mktemp("stack"), env)) as s:
        yield s


def hooks_by_pid(log: Path) -> dict[int, Counter]:
    runs: dict[int, Counter] = {}
    for line in log.read_text().splitlines():
        event, pid = line.split()
        runs.setdefault(int(pid), Counter())[event] += 1
    return runs


def test_the_sidecar_publishes_the_apps_sidekiq_version(stack: Stack):
    health = requests.get(stack.sidecar_url + "/health", timeout=5).json()
    version = stack.api1({"op": "sidekiq_version"})
    assert version["published"] == version["loaded"] == health["sidekiq_version"]


def test_the_sidecar_publishes_its_version_again_on_each_beat(stack: Stack):
    """A flushed key (or a Redis that was down when the sidecar booted) heals within a beat, so
    no bridge or worker waits for a version for long (beats: 5 s on 6.x, 10 s on 7+)."""
    key = SIDEKIQ_VERSION_KEY
    stack.sidekiq_redis.delete(key)
    wait_for(
        lambda: stack.sidekiq_redis.get(key) is not None,
        timeout=30,
        message="version not re-published",
    )
    assert stack.sidekiq_redis.get(key).decode() == stack.api1({"op": "sidekiq_version"})["loaded"]


def test_lifecycle_hooks_run_once_per_sidecar_process(stack: Stack, lifecycle_log: Path):
    first_pid = stack.sidecar.pid
    assert hooks_by_pid(lifecycle_log)[first_pid]["startup"] == 1, "startup ran before /ready"
    jid = stack.api1({"op": "perform_async", "class": "HardJob", "args": ["lifecycle"]})
    stack.wait_runs([jid], "HardJob")

    assert stack.sidecar.stop() == 0
    stack.sidecar.start()
    second_pid = stack.sidecar.pid
    assert stack.sidecar.stop() == 0

    runs = hooks_by_pid(lifecycle_log)
    assert set(runs) == {first_pid, second_pid}
    for pid in (first_pid, second_pid):
        hooks = runs[pid]
        hooks.pop("beat", None)  # every heartbeat on Sidekiq 6.5+; not a once-only hook
        assert hooks == Counter(startup=1, heartbeat=1, quiet=1, shutdown=1), pid
