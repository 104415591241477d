"""Celery beat schedules a Rails job: beat sends `gokiq.enqueue`, a gokiq worker pushes the
Sidekiq job (gokiq_celery.client, checked against Ruby's client in tests/test_client.py), and the
stack runs it like any job the app pushed: bridge, worker, sidecar."""

from __future__ import annotations

import json

import pytest

from ..conftest import wait_for
from .conftest import Stack

pytestmark = pytest.mark.e2e


def test_a_beat_entry_enqueues_a_rails_job_that_the_stack_runs(stack: Stack):
    beat = stack.add_service(
        "beat",
        [
            str(stack.worker.argv[0]),
            "-A",
            "tests.e2e.beat_app",
            "beat",
            "--schedule",
            str(stack.tmp / "celerybeat-schedule"),
        ],
        ready=lambda: True,
        env={"BEAT_EVERY": "3"},
    ).start()
    rows = []

    def two_ran() -> bool:
        nonlocal rows
        rows = [r for r in stack.job_runs("HardJob") if r["args"] == json.dumps(["from beat"])]
        return len(rows) >= 2

    wait_for(two_ran, timeout=90, interval=2, message=f"beat's jobs did not run: {rows}")
    beat.stop()
    # Each tick is its own Sidekiq job (own jid) that ran through the app's server middleware.
    assert len({r["jid"] for r in rows}) == len(rows)
    assert all(r["middleware"] for r in rows)
    # On the queue the beat entry named, as the sidecar saw each run.
    done = {e["jid"]: e for e in stack.sidecar_done()}
    for row in rows:
        assert (done[row["jid"]]["queue"], done[row["jid"]]["outcome"]) == ("critical", "ok")
