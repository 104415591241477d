"""The job history through the whole stack: the bridge and the worker record into a real
PostgreSQL (a throwaway cluster this module starts, so that it can kill it), and `gokiq-api`
answers "what happened to job X?" for every kind of job the example app has. Then the
database dies mid-load: every job still runs, and the history catches up once it is back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests

from gokiq_history import migrations
from gokiq_history.recorder import invalid_jid

from ..conftest import VENV_BIN, free_port, wait_for
from ..history_support import PgCluster, create_database
from .conftest import Service, Stack, _http_ok, metric_value, running

pytestmark = pytest.mark.e2e

TOKEN = "e2e-history-token"


class HistoryStack:
    """The stack, its PostgreSQL cluster, and a gokiq-api reading the same database."""

    def __init__(self, stack: Stack, cluster: PgCluster, api: Service, api_url: str) -> None:
        self.stack, self.cluster, self.api, self.api_url = stack, cluster, api, api_url

    def job(self, jid: str) -> dict[str, Any] | None:
        response = requests.get(
            f"{self.api_url}/v1/jobs/{jid}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def wait_state(
        self, jid: str, state: str, timeout: float = 120, enqueued: bool = True
    ) -> dict[str, Any]:
        """The job once it is in `state` and (`enqueued`) its enqueue is recorded too: the bridge
        records a fetch after publishing it, so a fast job's end can reach the database first."""
        found: dict[str, Any] | None = None

        def reached() -> bool:
            nonlocal found
            found = self.job(jid)
            recorded = found and (found["enqueued_at"] or not enqueued)
            return bool(recorded and found["state"] == state)

        wait_for(reached, timeout=timeout, interval=0.5, message=f"{jid} not {state}: {found}")
        assert found is not None
        return found

    def count(self, state: str, job_class: str) -> int:
        total, cursor = 0, None
        while True:
            params = {"state": state, "class": job_class, "limit": 500}
            page = requests.get(
                f"{self.api_url}/v1/jobs",
                params={**params, **({"cursor": cursor} if cursor else {})},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ).json()
            total += len(page["jobs"])
            cursor = page["next_cursor"]
            if cursor is None:
                return total


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Iterator[HistoryStack]:
    tmp = tmp_path_factory.mktemp("history")
    cluster = PgCluster().start()
    try:
        url = create_database(cluster.admin_url)
        migrations.upgrade(url)
        env = {"GOKIQ_HISTORY_URL": url}
        with running(Stack(tmp / "stack", env)) as stack:
            port = free_port()
            api_env = {**stack.env, **env, "GOKIQ_API_PORT": str(port), "GOKIQ_API_TOKENS": TOKEN}
            api_url = f"http://127.0.0.1:{port}"
            api = Service(
                "api",
                [str(VENV_BIN / "gokiq-api")],
                api_env,
                stack.tmp / "logs" / "api.log",
                lambda: _http_ok(api_url + "/health"),
            )
            api.start()
            try:
                yield HistoryStack(stack, cluster, api, api_url)
            finally:
                api.stop()
    finally:
        cluster.remove()


def runs(job: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(r["attempt"], r["outcome"], r["error_class"]) for r in job["runs"]]


def test_each_kind_of_job_ends_in_its_state_with_its_runs_and_error(history: HistoryStack):
    stack = history.stack
    garbage = b'{"not": "a job", "jid": 7'
    ok, flaky, dead, discarded, dropped = stack.api(
        {"op": "perform_async", "class": "NoopJob", "args": []},
        {"op": "perform_async", "class": "FlakyJob", "args": ["history-flaky", 1]},
        {"op": "perform_async", "class": "RetryZeroJob", "args": []},
        {"op": "perform_async", "class": "RetryInJob", "args": ["discard"]},
        {"op": "perform_async", "class": "NoRetryJob", "args": []},
    )
    stack.push_raw("default", garbage)

    job = history.wait_state(ok, "succeeded")
    assert (job["class"], job["queue"], job["attempts"], job["error_class"]) == (
        "NoopJob", "default", 1, None,
    )  # fmt: skip
    assert runs(job) == [(1, "ok", None)]
    assert job["enqueued_at"] and job["finished_at"] >= job["first_started_at"]
    assert job["args"] is None  # history_record_args is off by default
    assert job["worker"] and job["runtime"] >= 0

    job = history.wait_state(dead, "dead")
    assert (job["error_class"], job["error_message"]) == ("RuntimeError", "retry zero")
    assert runs(job) == [(1, "dead", "RuntimeError")]

    job = history.wait_state(discarded, "discarded")
    assert runs(job) == [(1, "discarded", "RuntimeError")] and job["finished_at"]

    job = history.wait_state(dropped, "dropped")
    assert (job["error_class"], job["error_message"]) == ("RuntimeError", "no retry")
    assert runs(job) == [(1, "dropped", "RuntimeError")]

    job = history.wait_state(invalid_jid(garbage), "dead", enqueued=False)
    assert (job["class"], job["error_class"], job["runs"]) == ("(invalid)", "InvalidJob", [])

    for url in (stack.bridge_url, stack.worker_url):  # each process's recorder, on its /metrics
        assert metric_value(stack.metrics(url), "gokiq_history_written_total") > 0, url

    # Sidekiq's first retry waits 15 s + jitter; the job is "retrying" until then, due then.
    job = history.wait_state(flaky, "retrying", timeout=60)
    assert epoch(job["due_at"]) > epoch(job["last_started_at"]) + 10
    job = history.wait_state(flaky, "succeeded", timeout=180)
    assert runs(job) == [(1, "retry", "RuntimeError"), (2, "ok", None)]
    assert (job["attempts"], job["error_message"]) == (2, "flaky 1")  # the last error stays
    assert job["last_started_at"] > job["first_started_at"]


def epoch(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_a_job_pushed_with_perform_in_shows_as_scheduled_with_its_due_time(
    history: HistoryStack,
):
    """Pushed by the Rails app's own Sidekiq client into `schedule`: seen there by the bridge."""
    stack = history.stack
    now, later, soon = stack.api(
        {"op": "now"},
        {"op": "perform_in", "class": "NoopJob", "in": 3600, "args": []},
        {"op": "perform_in", "class": "NoopJob", "in": 8, "args": []},
    )
    job = history.wait_state(later, "scheduled", timeout=30, enqueued=False)
    assert abs(epoch(job["due_at"]) - (now + 3600)) < 1
    assert (job["class"], job["queue"], job["enqueued_at"], job["runs"]) == (
        "NoopJob", "default", None, [],
    )  # fmt: skip
    assert history.wait_state(soon, "scheduled", timeout=8, enqueued=False)["due_at"]
    job = history.wait_state(soon, "succeeded", timeout=60)
    assert abs(epoch(job["due_at"]) - (now + 8)) < 1  # when it was due stays
    assert epoch(job["enqueued_at"]) >= epoch(job["due_at"]) and runs(job) == [(1, "ok", None)]


def test_a_dead_database_stops_no_job_and_history_catches_up(history: HistoryStack):
    stack, n = history.stack, 400
    [jids] = stack.api(
        {"op": "push_bulk", "class": "HardJob", "args": [["history-down", i] for i in range(n)]}
    )
    before = len(stack.worker.lines())
    history.cluster.stop("immediate")  # as a crash: connections cut, no checkpoint
    try:
        stack.wait_runs(jids, "HardJob", timeout=300)  # every job ran, database or not
        failed_writes = [
            line for line in stack.worker.lines()[before:] if "history: cannot write" in line
        ]
        assert failed_writes, "the worker never noticed the database was down"
    finally:
        history.cluster.start()
    # Back: what was buffered meanwhile is written, and new jobs are recorded as before.
    [after] = stack.api({"op": "perform_async", "class": "NoopJob", "args": []})
    history.wait_state(after, "succeeded", timeout=60)
    wait_for(
        lambda: history.count("succeeded", "HardJob") >= n,
        timeout=120,
        interval=2,
        message="the history did not catch up with the jobs run while it was down",
    )
    assert all(history.job(jid)["state"] == "succeeded" for jid in jids[:: n // 20])
