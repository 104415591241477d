"""The job history's database side, on a real PostgreSQL and on SQLite: migrations, merged
upserts that converge whatever the order, the recorder's buffer, bound and retention."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, inspect, select

from bridge.metrics import BridgeMetrics
from bridge.scheduler import Scheduler
from gokiq_celery.settings import Settings, load_settings
from gokiq_celery.sidekiq.job import Job
from gokiq_celery.sidekiq.keys import SCHEDULE
from gokiq_history import migrations, store
from gokiq_history.recorder import NULL_RECORDER, HistoryRecorder, invalid_jid, open_recorder
from gokiq_history.rows import fold, job_event, merge_job
from gokiq_history.schema import attempts, jobs
from gokiq_ingest import audit

from .bridge_support import bridge_env, bridge_redis
from .conftest import REPO
from .history_support import pg_admin_url, pg_url

__all__ = ["bridge_env", "bridge_redis", "pg_admin_url", "pg_url"]  # fixtures used below


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'history.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    migrations.upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator:
    engine = store.open_engine(db_url)
    with engine.begin() as conn:
        conn.execute(delete(attempts))
        conn.execute(delete(jobs))
    yield engine
    engine.dispose()


def read_job(engine, jid: str) -> dict:
    found = store.get_job(engine, jid)
    assert found is not None, f"no row for {jid}"
    return found[0]


def lifecycle(jid: str, t0: float) -> list[dict]:
    """A job's events in the order they happened: scheduled (perform_in), enqueued when due,
    run, retry (seen waiting in `retry` too), run, success."""
    return [
        job_event(jid, "scheduled", t0 - 60, 1, job_class="HardJob", queue="default",
                  due_at=t0),
        job_event(jid, "enqueued", t0, 1, job_class="HardJob", queue="default", enqueued_at=t0),
        job_event(jid, "running", t0 + 1, 1, attempts=1, first_started_at=t0 + 1,
                  last_started_at=t0 + 1, worker="w1"),
        job_event(jid, "retrying", t0 + 2, 1, attempts=1, runtime=1.0, worker="w1",
                  error_class="RuntimeError", error_message="boom", error_at=t0 + 2,
                  due_at=t0 + 19),
        job_event(jid, "retrying", t0 + 3, 1, attempts=1, due_at=t0 + 19.5, created_at=t0 - 60,
                  error_class="RuntimeError", error_message="boom", error_at=t0 + 2),
        job_event(jid, "running", t0 + 20, 2, attempts=2, first_started_at=t0 + 20,
                  last_started_at=t0 + 20, worker="w2"),
        job_event(jid, "succeeded", t0 + 21, 2, attempts=2, runtime=0.5, finished_at=t0 + 21,
                  worker="w2"),
    ]  # fmt: skip


def test_migrations_create_the_tables_and_indexes_and_go_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    assert migrations.current(url) is None
    migrations.upgrade(url)
    assert migrations.current(url) == migrations.head()
    engine = store.open_engine(url)
    names = {ix["name"] for ix in inspect(engine).get_indexes("gokiq_jobs")}
    assert names == {ix.name for ix in jobs.indexes}
    assert {c["name"] for c in inspect(engine).get_columns("gokiq_jobs")} == set(jobs.c.keys())
    migrations.downgrade(url)
    assert "gokiq_jobs" not in inspect(engine).get_table_names()
    engine.dispose()


def test_migrations_match_the_schema_on_postgresql(pg_url):
    migrations.upgrade(pg_url)
    engine = store.open_engine(pg_url)
    try:
        assert {ix["name"] for ix in inspect(engine).get_indexes("gokiq_jobs")} == {
            ix.name for ix in jobs.indexes
        }
        columns = {c["name"] for c in inspect(engine).get_columns("gokiq_job_attempts")}
        assert columns == set(attempts.c.keys())
    finally:
        engine.dispose()


def test_a_lifecycle_written_in_order_ends_succeeded(engine):
    events = lifecycle("j1", 1000.0)
    for event in events:
        store.write_batch(engine, [event], [])
    row = read_job(engine, "j1")
    assert (row["state"], row["attempts"], row["worker"]) == ("succeeded", 2, "w2")
    assert (row["first_started_at"], row["last_started_at"]) == (1001.0, 1020.0)
    assert (row["error_class"], row["error_message"]) == ("RuntimeError", "boom")
    assert (row["finished_at"], row["runtime"], row["enqueued_at"]) == (1021.0, 0.5, 1000.0)
    assert (row["due_at"], row["created_at"]) == (1019.5, 940.0)  # the last due time seen


def test_a_terminal_state_is_not_overwritten_by_an_older_event(engine):
    events = lifecycle("j2", 1000.0)
    store.write_batch(engine, [events[-1]], [])  # succeeded first
    for event in events[:-1]:  # then the older ones, late
        store.write_batch(engine, [event], [])
    assert read_job(engine, "j2")["state"] == "succeeded"
    # The bridge notes a fetch after publishing it: by then the job may have run, so a later
    # "enqueued" of the same attempt must not take it back.
    store.write_batch(engine, [job_event("j2", "enqueued", 1030.0, 2)], [])
    assert read_job(engine, "j2")["state"] == "succeeded"
    # A later attempt (Sidekiq's "Retry now" on a dead job) does move it on.
    store.write_batch(engine, [job_event("j2", "enqueued", 2000.0, 3)], [])
    row = read_job(engine, "j2")
    assert (row["state"], row["finished_at"], row["attempts"]) == ("enqueued", None, 2)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.permutations(range(7)), cuts=st.sets(st.integers(1, 6)), replay=st.booleans())
def test_any_order_batching_or_replay_converges_to_the_python_fold(engine, order, cuts, replay):
    jid = f"p{random.getrandbits(40)}"
    events = lifecycle(jid, 1000.0)
    shuffled = [events[i] for i in order] + (events[:3] if replay else [])
    bounds = [0, *sorted(c for c in cuts if c < len(shuffled)), len(shuffled)]
    for start, end in itertools.pairwise(bounds):
        batch = fold(shuffled[start:end], ("jid",), merge_job)
        store.write_batch(engine, batch, [])
    expected = fold(events, ("jid",), merge_job)[0]
    assert read_job(engine, jid) == expected
    assert expected["state"] == "succeeded"


def recorder_for(url: str, **overrides) -> HistoryRecorder:
    """A recorder without its thread: the test flushes, so nothing races it."""
    return HistoryRecorder(Settings(history_url=url, **overrides), background=False)


def job(jid: str, **fields) -> Job:
    return Job.build({"class": "HardJob", "args": [1, "secret"], "jid": jid,
                      "queue": "default", "created_at": 1700000000.5, **fields})  # fmt: skip


def test_the_recorder_records_a_failed_run_then_a_success(engine, db_url):
    recorder = recorder_for(db_url)
    first = job("r1")
    recorder.enqueued([first], "default")
    recorder.started(first, "default")
    recorder.failed(first, "ArgumentError", "boom", retry_at=1800000000.25)
    recorder.finished(first, "retry")
    assert recorder.flush()
    row = read_job(engine, "r1")
    assert (row["state"], row["due_at"], row["finished_at"]) == ("retrying", 1800000000.25, None)
    second = job("r1", retry_count=0, error_class="ArgumentError")
    recorder.started(second, "default")
    recorder.finished(second, "ok")
    assert recorder.flush()
    row, runs = store.get_job(engine, "r1")
    assert (row["state"], row["attempts"], row["job_class"]) == ("succeeded", 2, "HardJob")
    assert row["created_at"] == 1700000000.5
    assert row["args"] is None  # off by default
    assert (row["error_class"], row["error_message"]) == ("ArgumentError", "boom")
    assert row["due_at"] == 1800000000.25  # when the retry was due: kept
    assert [(r["attempt"], r["outcome"], r["error_class"]) for r in runs] == [
        (1, "retry", "ArgumentError"),
        (2, "ok", None),
    ]
    assert all(r["finished_at"] >= r["started_at"] and r["worker"] for r in runs)
    recorder.close()


def test_a_run_still_going_at_a_flush_shows_as_running(engine, db_url):
    recorder = recorder_for(db_url)
    long = job("long")
    recorder.started(long, "critical")
    assert recorder.flush()
    row, runs = store.get_job(engine, "long")
    assert (row["state"], row["queue"], row["attempts"]) == ("running", "critical", 1)
    assert [(r["outcome"], r["finished_at"]) for r in runs] == [(None, None)]
    recorder.finished(long, "ok")
    assert recorder.flush()
    row, runs = store.get_job(engine, "long")
    assert (row["state"], row["finished_at"] is not None) == ("succeeded", True)
    assert [r["outcome"] for r in runs] == ["ok"]  # the same run, completed
    recorder.close()


def test_history_migrate_applies_the_migrations_before_the_first_write(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    recorder = recorder_for(url, history_migrate=True)
    recorder.enqueued([job("m1")])
    assert recorder.flush()
    assert migrations.current(url) == migrations.head()
    recorder.close()


def test_arguments_are_recorded_only_when_asked(engine, db_url):
    recorder = recorder_for(db_url, history_record_args=True)
    recorder.enqueued([job("a1")])
    recorder.invalid(b"{not json", "default")
    assert recorder.flush()
    assert read_job(engine, "a1")["args"] == '[1, "secret"]'
    garbage = read_job(engine, invalid_jid(b"{not json"))
    assert (garbage["state"], garbage["job_class"]) == ("dead", "(invalid)")
    recorder.close()


def test_a_database_that_is_down_costs_history_rows_not_jobs(tmp_path):
    missing = tmp_path / "not-yet"
    url = f"sqlite:///{missing / 'h.sqlite3'}"
    recorder = recorder_for(url, history_buffer=30)
    for n in range(20):  # 20 jobs x (a job event + a run event) = 40 > 30
        ran = job(f"d{n}")
        recorder.started(ran, "default")
        recorder.finished(ran, "ok")
    assert recorder.metrics.dropped._value.get() == 10
    assert not recorder.flush()  # cannot open the file: kept for the next flush
    kept = recorder.pending()
    assert 0 < kept <= 30
    missing.mkdir()
    migrations.upgrade(url)
    assert recorder.flush()  # the database is back: what was kept is written
    engine = store.open_engine(url)
    written = store.list_jobs(engine, filters={}, since=None, until=None, limit=100, cursor=None)[0]
    assert len(written) == 15 and {r["state"] for r in written} == {"succeeded"}
    recorder.close()
    engine.dispose()


def test_retention_deletes_old_jobs_and_their_runs_in_batches(engine, db_url):
    recorder = recorder_for(db_url, history_retention=3600.0)
    old = [job_event(f"old{n}", "succeeded", time.time() - 7200) for n in range(25)]
    new = [job_event("new", "succeeded", time.time())]
    store.write_batch(engine, old + new, [{"jid": "old1", "started_at": 1.0, "attempt": 1,
        "finished_at": None, "outcome": None, "error_class": None, "error_message": None,
        "worker": None, "runtime": None}])  # fmt: skip
    recorder._engine = engine
    recorder.writer.RETENTION_BATCH = 10
    assert recorder.delete_expired() == 25
    assert store.get_job(engine, "old1") is None
    assert store.get_job(engine, "new") is not None
    with engine.connect() as conn:
        assert conn.execute(attempts.select()).first() is None


def test_a_retention_backlog_is_deleted_a_round_per_write_not_a_round_a_minute(engine, db_url):
    recorder = recorder_for(db_url, history_retention=3600.0)
    old = [job_event(f"backlog{n}", "succeeded", time.time() - 7200) for n in range(25)]
    store.write_batch(engine, old, [])
    recorder._engine = engine
    writer = recorder.writer
    writer.RETENTION_BATCH, writer.RETENTION_BATCHES = 5, 2  # a round: 2 deletes of 5 jobs

    def left() -> int:
        page = store.list_jobs(engine, filters={}, since=None, until=None, limit=100, cursor=None)
        return sum(1 for row in page[0] if row["jid"].startswith("backlog"))

    assert [(writer.retain(), left())[1] for _ in range(4)] == [15, 5, 0, 0]
    recorder.close()


def test_keyset_pages_walk_every_job_once_newest_first(engine):
    rows = [
        job_event(f"k{n:02d}", "dead" if n % 3 else "succeeded", 100.0 + n // 2,
                  job_class="A" if n % 2 else "B", queue="q")
        for n in range(30)
    ]  # fmt: skip
    store.write_batch(engine, rows, [])
    seen, cursor = [], None
    while True:
        page, cursor = store.list_jobs(
            engine, filters={"state": "dead"}, since=None, until=None, limit=4, cursor=cursor
        )
        seen += page
        if cursor is None:
            break
    keys = [(r["created_at"], r["jid"]) for r in seen]
    assert keys == sorted(keys, reverse=True)
    assert {r["jid"] for r in seen} == {r["jid"] for r in rows if r["state"] == "dead"}
    window = store.list_jobs(
        engine, filters={"job_class": "A"}, since=105.0, until=110.0, limit=100, cursor=None
    )[0]
    assert window and all(r["job_class"] == "A" and 105 <= r["created_at"] < 110 for r in window)
    counts = dict(((c, s), n) for c, s, n in store.stats(engine, 0.0))
    assert sum(counts.values()) == 30 and counts[("B", "succeeded")] == 5


def test_a_bad_cursor_is_refused():
    for bad in ("", "!!!", "bm90IGpzb24", store.encode_cursor(1.0, "x")[:-3] + "AAA"):
        with pytest.raises(store.BadCursor):
            store.decode_cursor(bad)
    assert store.decode_cursor(store.encode_cursor(12.5, "jid")) == (12.5, "jid")


def test_history_off_starts_nothing_and_imports_no_sqlalchemy():
    assert open_recorder(Settings()) is NULL_RECORDER
    code = (
        "import sys, bridge.runner, gokiq_celery.tasks\n"
        "from gokiq_celery.settings import Settings\n"
        "from gokiq_history.recorder import open_recorder, NULL_RECORDER\n"
        "assert open_recorder(Settings()) is NULL_RECORDER\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_history_settings_read_durations_and_hide_the_url():
    # Bad values: tests/test_settings.py::test_bad_values_name_the_key.
    s = load_settings(environ={"GOKIQ_HISTORY_URL": "sqlite:///x", "GOKIQ_HISTORY_RETENTION": "2d"})
    assert (s.history_url, s.history_retention) == ("sqlite:///x", 172800.0)
    assert load_settings(environ={"GOKIQ_HISTORY_RETENTION": "90"}).history_retention == 90.0
    assert "sqlite:///x" not in repr(s)  # a URL may hold a password


def test_gokiq_history_migrate_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    cli = Path(sys.executable).with_name("gokiq-history")
    done = subprocess.run([str(cli), "--url", url, "migrate"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == migrations.head()
    empty = subprocess.run(
        [str(cli), "current"], capture_output=True, text=True, env={"PATH": "/usr/bin"}
    )
    assert empty.returncode == 2 and "history_url" in empty.stderr


def test_the_bridges_scheduler_records_what_it_moves_and_what_it_buries(bridge_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    migrations.upgrade(url)
    store_ = bridge_env.store()
    now = time.time()
    due = Job.build({"class": "HardJob", "args": [1], "jid": "s1", "queue": "low",
                     "created_at": now - 60})  # fmt: skip
    store_.redis.zadd(SCHEDULE, {due.text: now - 1, b"{garbage": now - 1})
    scheduler = Scheduler(store_, "b1", BridgeMetrics())
    scheduler.history = recorder_for(url)
    assert scheduler.move_due() == 1
    assert scheduler.history.flush()
    engine = store.open_engine(url)
    row = read_job(engine, "s1")
    assert (row["state"], row["queue"], row["job_class"]) == ("enqueued", "low", "HardJob")
    assert row["enqueued_at"] >= now  # the scheduler's new enqueued_at
    assert read_job(engine, invalid_jid(b"{garbage"))["state"] == "dead"
    engine.dispose()


def test_the_audit_writes_its_rows_as_given_and_deletes_the_expired_on_both_databases(engine):
    # The audit's table lives in the history database (migration 0003).
    auditor = audit.Auditor(engine, retention=3600, limit=100, background=False)
    events = [
        audit.event(202, client="etl", source_ip="10.0.0.1", job_class="HardJob",
                    queue="default", jid=f"a{n}")
        for n in range(3)
    ] + [audit.event(403, client=None, source_ip="::1", reason="queue not allowed: é")]  # fmt: skip
    events[0]["at"] = 1700000000  # an int time: written as the float it is
    events[1]["at"] = time.time() - 7200  # expired
    auditor.record(events)
    assert auditor.flush()
    columns = list(audit.COLUMNS)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(audit.audit).order_by("id"))]
    assert [{k: row[k] for k in columns} for row in rows] == events
    assert auditor.writer.delete_expired() == 2  # the int time is 2023's: expired too
    with engine.connect() as conn:
        left = [r.jid for r in conn.execute(select(audit.audit).order_by("id"))]
        conn.execute(audit.audit.delete())
        conn.commit()
    assert left == ["a2", None]
