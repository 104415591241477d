"""The ingestion API through the whole stack: a Python client (requests) enqueues a plain job,
a scheduled job and an ActiveJob through a `gokiq-api` process; the bridge, the Celery worker
and the sidecar run them on the example app; the history (a real PostgreSQL) shows each from
its submission on; the refused submissions are in the audit table.

While the jobs are submitted the bridge is stopped (SIGSTOP), so that the first states in the
history can only have been written by the API: `enqueued`, or `scheduled` for the job given
`in`. Then it goes on (SIGCONT) and every job ends `succeeded`."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from sqlalchemy import select

from gokiq_history import migrations, store
from gokiq_ingest.audit import audit

from ..conftest import VENV_BIN, free_port, wait_for
from ..history_support import pg_admin_url, pg_url
from .conftest import Service, Stack, _http_ok, running
from .test_history import TOKEN as HISTORY_TOKEN
from .test_history import HistoryStack

__all__ = ["pg_admin_url", "pg_url"]  # fixtures used below

pytestmark = pytest.mark.e2e

PIPELINE = "e2e-ingest-pipeline-token"
READER = HISTORY_TOKEN
CLIENTS = [
    {"name": "pipeline", "token": PIPELINE, "classes": ["HardJob", "GreetJob", "Namespaced::*"],
     "queues": ["default", "critical"], "rate": 100, "burst": 100},
]  # fmt: skip


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class IngestStack(HistoryStack):
    """The stack, recording into `history_url`, and a gokiq-api process in front of it that
    takes jobs and answers for their history (with test_history's reader token)."""

    def __init__(self, stack: Stack, api: Service, api_url: str, history_url: str) -> None:
        super().__init__(stack, None, api, api_url)  # type: ignore[arg-type]  # no cluster of its own
        self.history_url = history_url
        self.session = requests.Session()

    def submit(self, body: dict[str, Any], token: str = PIPELINE) -> requests.Response:
        return self.session.post(
            self.api_url + "/v1/jobs",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    def audit_rows(self) -> list[dict[str, Any]]:
        engine = store.open_engine(self.history_url)
        try:
            with engine.connect() as conn:
                query = select(audit).order_by(audit.c.id)
                return [dict(r) for r in conn.execute(query).mappings()]
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def ingest(tmp_path_factory, pg_url) -> Iterator[IngestStack]:
    migrations.upgrade(pg_url)
    env = {"GOKIQ_HISTORY_URL": pg_url}
    with running(Stack(tmp_path_factory.mktemp("ingest"), env)) as stack:
        port = free_port()
        api_url = f"http://127.0.0.1:{port}"
        api_env = {
            **stack.env,
            **env,
            "GOKIQ_API_PORT": str(port),
            "GOKIQ_API_CLIENTS": json.dumps(CLIENTS),
            "GOKIQ_API_TOKENS": READER,
        }
        api = stack.add_service(
            "api", [str(VENV_BIN / "gokiq-api")], lambda: _http_ok(api_url + "/health"), api_env
        )
        api.start()
        yield IngestStack(stack, api, api_url, pg_url)


def test_a_python_client_enqueues_three_kinds_of_job_and_the_stack_runs_them(ingest):
    stack = ingest.stack
    # A Person for the ActiveJob's GlobalID: the app's own perform_later creates one (id 1 in
    # the stack's fresh database), and its job runs first.
    (first,) = stack.api(
        {"op": "perform_later", "class": "GreetJob", "args": [{"$person": "Ann"}],
         "kwargs": {"greeting": "Hello"}},
    )  # fmt: skip
    stack.wait_runs([first], "GreetJob", timeout=60)

    os.kill(stack.bridge.pid, signal.SIGSTOP)  # nothing but the API records while it is stopped
    try:
        submitted_at = time.time()
        plain = ingest.submit({"class": "HardJob", "args": ["via-api", 1]})
        scheduled = ingest.submit({"class": "HardJob", "args": ["via-api", 2], "in": 4})
        active = ingest.submit(
            {"class": "GreetJob", "args": [{"_aj_globalid": "gid://example-app/Person/1"}],
             "kwargs": {"greeting": "Hi"}, "queue": "critical"},
        )  # fmt: skip
        for reply in (plain, scheduled, active):
            assert reply.status_code == 201, reply.text
        jids = {name: r.json()["jid"] for name, r in
                (("plain", plain), ("scheduled", scheduled), ("active", active))}  # fmt: skip
        assert scheduled.json()["at"] == pytest.approx(submitted_at + 4, abs=2)

        # Their history starts at the submission (written by the API alone: the bridge is stopped).
        first_states = {
            "plain": ingest.wait_state(jids["plain"], "enqueued", timeout=10),
            "scheduled": ingest.wait_state(jids["scheduled"], "scheduled", 10, enqueued=False),
            "active": ingest.wait_state(jids["active"], "enqueued", timeout=10),
        }
    finally:
        os.kill(stack.bridge.pid, signal.SIGCONT)
    assert (first_states["active"]["class"], first_states["active"]["queue"]) == (
        "GreetJob", "critical",
    )  # fmt: skip
    assert first_states["scheduled"]["enqueued_at"] is None  # not due yet
    for name, row in first_states.items():
        assert epoch(row["created_at"]) == pytest.approx(submitted_at, abs=5), name
        assert row["runs"] == [], name

    rows = stack.wait_runs(jids.values(), timeout=90)
    by_jid = {r["jid"]: r for r in rows}
    assert json.loads(by_jid[jids["plain"]]["args"]) == ["via-api", 1]
    assert json.loads(by_jid[jids["scheduled"]]["args"]) == ["via-api", 2]
    assert by_jid[jids["active"]]["note"] == "Hi, Ann!"  # the sidecar located the GlobalID
    ran_at = by_jid[jids["scheduled"]]["created_at"]
    assert ran_at >= scheduled.json()["at"] - 0.5  # not before it was due (Sidekiq's poll)

    for name, jid in jids.items():
        final = ingest.wait_state(jid, "succeeded", timeout=30)
        assert final["created_at"] == first_states[name]["created_at"], name
        assert final["enqueued_at"], name
        assert [(r["attempt"], r["outcome"]) for r in final["runs"]] == [(1, "ok")], name

    accepted = {r["jid"]: r for r in ingest.audit_rows() if r["outcome"] == "accepted"}
    for jid in jids.values():
        assert accepted[jid]["client"] == "pipeline" and accepted[jid]["status"] == 201


def test_refused_submissions_are_audited_and_enqueue_nothing(ingest):
    stack = ingest.stack
    refused = [
        ({"class": "HardJob", "args": [], "queue": "low"}, PIPELINE, 403),  # not its queue
        ({"class": "NoopJob", "args": []}, PIPELINE, 403),  # not its class
        ({"class": "Namespaced::NoSuchJob", "args": []}, PIPELINE, 422),  # not the app's
        ({"class": "HardJob", "args": []}, "e2e-ingest-wrong-token-000", 401),
        ({"class": "HardJob", "args": []}, READER, 403),  # may read, not enqueue
    ]
    before = time.time()
    for body, token, status in refused:
        reply = ingest.submit(body, token)
        assert reply.status_code == status, reply.text

    def audited() -> list[dict[str, Any]] | None:
        rows = [r for r in ingest.audit_rows() if r["at"] >= before]
        return rows if len(rows) >= len(refused) else None

    rows = wait_for(audited, timeout=10, interval=0.3, message="refusals not in the audit table")
    assert [(r["status"], r["outcome"]) for r in rows] == [(s, "refused") for _, _, s in refused]
    assert [r["client"] for r in rows] == ["pipeline", "pipeline", "pipeline", None, "token-1"]
    assert rows[0]["queue"] == "low" and "queue low" in rows[0]["reason"]
    assert rows[2]["job_class"] == "Namespaced::NoSuchJob"
    assert "not a job class" in rows[2]["reason"]
    assert all(r["jid"] is None and r["source_ip"] == "127.0.0.1" for r in rows)
    assert not stack.sidekiq_redis.llen("queue:low")
