"""Events dropped from a full buffer: counted at once, logged at most once a minute, by the
history recorder and the ingestion API's audit alike (gokiq_history.drops)."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import create_engine

from gokiq_history.drops import DropLog
from gokiq_ingest import audit


def warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 30]


def test_drops_are_counted_at_once_and_logged_once_a_minute(caplog, monkeypatch):
    counted: list[int] = []
    drops = DropLog(logging.getLogger("gokiq.test.drops"), "things", 10, counted.append)
    clock = [1000.0]
    monkeypatch.setattr("gokiq_history.drops.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, "gokiq.test.drops"):
        drops.add(3)
        drops.add(0)
        drops.add(4)
        clock[0] += 59
        drops.add(1)
        assert warnings(caplog, "gokiq.test.drops") == [
            "things: 3 events dropped (buffer of 10 full: the database is slow or down)"
        ]
        clock[0] += 1
        drops.add(2)  # a minute after the first line: the drops since, in one line
    assert warnings(caplog, "gokiq.test.drops")[1:] == [
        "things: 7 events dropped (buffer of 10 full: the database is slow or down)"
    ]
    assert counted == [3, 4, 1, 2] and drops.total == 10


def test_the_audit_counts_and_logs_what_a_full_buffer_drops(tmp_path, caplog):
    # A real SQLite database without the audit table: every write fails, as while it is down.
    engine = create_engine(f"sqlite:///{tmp_path / 'no-table.sqlite3'}")
    auditor = audit.Auditor(engine, retention=3600, limit=3, background=False)  # flushed by hand
    events = [audit.event(403, client="etl", source_ip="::1", reason=str(n)) for n in range(5)]
    with caplog.at_level(logging.WARNING, "gokiq.ingest.audit"):
        auditor.record(events)
        assert not auditor.flush()  # the 3 kept are put back
        auditor.record(events[:2])  # no room: both dropped
        auditor.engine = create_engine(f"sqlite:///{tmp_path / 'other.sqlite3'}")
        audit.audit.create(auditor.engine)
        assert auditor.flush()
    assert auditor.drops.total == 4
    dropped = [m for m in warnings(caplog, "gokiq.ingest.audit") if "dropped" in m]
    assert dropped == ["audit: 2 events dropped (buffer of 3 full: the database is slow or down)"]
    with auditor.engine.connect() as conn:
        reasons = [r.reason for r in conn.execute(audit.audit.select().order_by(audit.audit.c.id))]
    assert reasons == ["0", "1", "2"]  # the first ones kept, in order


def test_a_bulk_waits_for_room_in_the_audit_while_the_database_takes_it(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    audit.audit.create(engine)
    auditor = audit.Auditor(engine, retention=3600, limit=3)  # its own writer thread
    events = [audit.event(201, client="etl", source_ip="::1", jid=str(n)) for n in range(9)]
    try:
        for n in range(0, 9, 3):  # each fills the buffer: the next waits for the thread
            asyncio.run(auditor.room_for(3, timeout=30))
            auditor.record(events[n : n + 3])
    finally:
        auditor.close()
    assert auditor.drops.total == 0
    with engine.connect() as conn:
        jids = [r.jid for r in conn.execute(audit.audit.select().order_by(audit.audit.c.id))]
    assert jids == [str(n) for n in range(9)]


def test_a_database_that_refuses_the_audit_is_not_waited_for(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'no-table.sqlite3'}")  # every write fails
    auditor = audit.Auditor(engine, retention=3600, limit=3)
    events = [audit.event(201, client="etl", source_ip="::1", jid=str(n)) for n in range(3)]
    try:
        auditor.record(events)
        deadline = time.monotonic() + 10
        while auditor.writer._writing and time.monotonic() < deadline:  # until a batch fails
            time.sleep(0.01)
        started = time.monotonic()
        asyncio.run(auditor.room_for(3, timeout=30))
        waited = time.monotonic() - started
        auditor.record(events)
    finally:
        auditor.close()
    assert waited < 10  # not the 30 s a bulk waits for a database that takes its rows
    assert auditor.drops.total == 3
