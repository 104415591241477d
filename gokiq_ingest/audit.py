"""The audit of the ingestion API: every submission accepted or refused, with the client, the
class, the queue, the jid or the reason, the source address and the time; never the arguments.

Each event is logged at once (one JSON line, `submission accepted` / `submission refused`) and
written to the history database's `gokiq_ingest_audit` table by a background thread, in
batches, as the history is: a database that is down never holds up a submission. A bulk waits
on the event loop, up to `router.AUDIT_WAIT`, for room in the buffer (`history_buffer` events)
while the database takes the batches, so bulks faster than the database slow down rather than
lose their rows; beyond that, and while the database refuses them, events are dropped, counted
and logged at most once a minute (`gokiq_history.writer`, the history's buffer). Until a batch
is written it is only in memory: a crash of gokiq-api loses the table's rows for the last
`INTERVAL` (or for as long as the database was down), never a job, and each event's log line
was written when it happened.
The same thread deletes the events older than `history_retention`. Without `history_url`, only
the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    SmallInteger,
    Table,
    Text,
    delete,
    select,
)

from gokiq_history import store
from gokiq_history.schema import metadata
from gokiq_history.writer import BufferedWriter

log = logging.getLogger("gokiq.ingest.audit")

audit = Table(
    "gokiq_ingest_audit",
    metadata,
    # SQLite autoincrements only an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("at", Float, nullable=False),
    Column("client", Text),  # the client's name; null: no or an unknown token
    Column("outcome", Text, nullable=False),  # accepted | refused
    Column("status", SmallInteger, nullable=False),  # the HTTP status of the job's answer
    Column("job_class", Text),
    Column("queue", Text),
    Column("jid", Text),
    Column("reason", Text),
    Column("source_ip", Text),
    Index("ix_gokiq_ingest_audit_at", "at"),
    Index("ix_gokiq_ingest_audit_client_at", "client", "at"),
)
COLUMNS = tuple(c.name for c in audit.c if c.name != "id")
REASON_LIMIT = 500


def event(
    status: int,
    *,
    client: str | None,
    source_ip: str | None,
    job_class: str | None = None,
    queue: str | None = None,
    jid: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    return {
        "at": time.time(),
        "client": client,
        "outcome": "accepted" if status < 300 else "refused",
        "status": status,
        "job_class": job_class,
        "queue": queue,
        "jid": jid,
        "reason": reason[:REASON_LIMIT] if reason else None,
        "source_ip": source_ip,
    }


class Auditor:
    INTERVAL = 0.2
    ROOM_POLL = 0.005  # while a bulk waits for room: a tenth of a batch's interval or less

    def __init__(self, engine, *, retention: float, limit: int, background: bool = True) -> None:
        self.engine, self.retention = engine, retention
        self.writer: BufferedWriter[dict[str, Any]] = BufferedWriter(
            "audit",
            log,
            limit,
            write=self._write,
            delete_expired=self._delete_expired,
            interval=self.INTERVAL,
            background=background,
        )
        self.drops = self.writer.drops

    def record(self, events: Sequence[dict[str, Any]]) -> None:
        """Log each event and buffer it for the table."""
        for e in events if log.isEnabledFor(logging.INFO) else ():
            message = "submission accepted" if e["outcome"] == "accepted" else "submission refused"
            log.info(message, extra={k: v for k, v in e.items() if v is not None and k != "at"})
        if self.engine is not None:
            self.writer.add(events)

    async def room_for(self, n: int, timeout: float) -> None:
        """Wait, at most `timeout` seconds and without holding a thread, until `n` more events
        fit in the buffer, while the database takes the batches (`BufferedWriter.has_room`)."""
        if self.engine is None:
            return
        deadline = time.monotonic() + timeout
        while not self.writer.has_room(n) and time.monotonic() < deadline:
            await asyncio.sleep(self.ROOM_POLL)

    def flush(self) -> bool:
        return self.writer.flush()

    def _write(self, events: list[dict[str, Any]]) -> None:
        store.insert_rows(self.engine, audit, COLUMNS, events)

    def _delete_expired(self, limit: int) -> int:
        cutoff = time.time() - self.retention
        with self.engine.begin() as conn:
            ids = select(audit.c.id).where(audit.c.at < cutoff).limit(limit)
            return conn.execute(delete(audit).where(audit.c.id.in_(ids))).rowcount

    def close(self) -> None:
        self.writer.close()
