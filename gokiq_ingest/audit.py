"""The audit of the ingestion API: every submission accepted or refused, with the client, the
class, the queue, the jid or the reason, the source address and the time; never the arguments.

Each event is logged at once (one JSON line, `submission accepted` / `submission refused`) and
written to the history database's `gokiq_ingest_audit` table by a background thread, in
batches, as the history is: a database that is slow or down never holds up a submission.
Events beyond `history_buffer` are dropped, counted and logged at most once a minute
(`gokiq_history.drops`, as the history recorder does). Until a batch is written it is only in
memory: a crash of gokiq-api loses the table's rows for the last `INTERVAL` (or for as long as
the database was down), never a job, and each event's log line was written when it happened.
The same thread deletes the events older than `history_retention`. Without `history_url`, only
the log.
"""

from __future__ import annotations

import logging
import threading
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
    insert,
    select,
)

from gokiq_history.drops import DropLog
from gokiq_history.schema import metadata

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
    RETRY_DELAY = 1.0
    RETENTION_INTERVAL = 60.0
    RETENTION_BATCH = 1000

    def __init__(self, engine, *, retention: float, limit: int) -> None:
        self.engine, self.retention, self.limit = engine, retention, limit
        self.drops = DropLog(log, "audit", limit)
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next_retention = 0.0
        self._thread: threading.Thread | None = None

    def record(self, events: Sequence[dict[str, Any]]) -> None:
        for e in events if log.isEnabledFor(logging.INFO) else ():
            message = "submission accepted" if e["outcome"] == "accepted" else "submission refused"
            log.info(message, extra={k: v for k, v in e.items() if v is not None and k != "at"})
        if self.engine is None:
            return
        with self._lock:
            room = max(self.limit - len(self._events), 0)
            self._events.extend(events[:room])
            dropped = len(events) - min(room, len(events))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gokiq-audit", daemon=True)
                self._thread.start()
        self.drops.add(dropped)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.INTERVAL if self.flush() else self.RETRY_DELAY
            self._delete_expired()
            self._stop.wait(delay)

    def flush(self) -> bool:
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return True
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(audit), events)
        except Exception as exc:
            log.warning("audit: cannot write %d events yet: %s", len(events), type(exc).__name__)
            with self._lock:
                kept = (events + self._events)[: self.limit]
                dropped = len(events) + len(self._events) - len(kept)
                self._events = kept
            self.drops.add(dropped)
            return False
        return True

    def _delete_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + self.RETENTION_INTERVAL
        try:
            self.delete_older_than(time.time() - self.retention)
        except Exception as exc:
            log.warning("audit: retention delete failed: %s", type(exc).__name__)

    def delete_older_than(self, cutoff: float) -> int:
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                ids = select(audit.c.id).where(audit.c.at < cutoff).limit(self.RETENTION_BATCH)
                count = conn.execute(delete(audit).where(audit.c.id.in_(ids))).rowcount
            deleted += count
            if count < self.RETENTION_BATCH:
                return deleted

    def close(self) -> None:
        self._stop.set()
        self.flush()
