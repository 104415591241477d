"""The history tables (SQLAlchemy Core). Times are epoch seconds (double precision), the same
in PostgreSQL and SQLite. The migrations in `migrations/versions` create exactly this."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
)

metadata = MetaData()

jobs = Table(
    "gokiq_jobs",
    metadata,
    Column("jid", Text, primary_key=True),
    Column("job_class", Text),  # the display class (ActiveJob's wrapped class)
    Column("queue", Text),
    Column("args", Text),  # JSON; only with history_record_args
    Column("state", Text, nullable=False),
    Column("state_rank", SmallInteger, nullable=False),
    Column("state_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", Float, nullable=False),  # the payload's created_at: the sort key
    Column("enqueued_at", Float),
    Column("due_at", Float),  # when it was due: last seen waiting in `schedule` or `retry`
    Column("first_started_at", Float),
    Column("last_started_at", Float),
    Column("finished_at", Float),
    Column("error_class", Text),
    Column("error_message", Text),
    Column("error_at", Float),
    Column("worker", Text),
    Column("runtime", Float),
    Column("updated_at", Float, nullable=False),  # retention deletes by this
    # Keyset pagination, newest first: unfiltered, by each filter, and by each documented pair
    # of filters (class and state, queue and state: one index range, no row filtered out; a
    # third filter is checked on the rows of that range); then retention.
    Index("ix_gokiq_jobs_created", "created_at", "jid"),
    Index("ix_gokiq_jobs_class_created", "job_class", "created_at", "jid"),
    Index("ix_gokiq_jobs_queue_created", "queue", "created_at", "jid"),
    Index("ix_gokiq_jobs_state_created", "state", "created_at", "jid"),
    Index("ix_gokiq_jobs_class_state_created", "job_class", "state", "created_at", "jid"),
    Index("ix_gokiq_jobs_queue_state_created", "queue", "state", "created_at", "jid"),
    Index("ix_gokiq_jobs_updated", "updated_at"),
)

attempts = Table(
    "gokiq_job_attempts",
    metadata,
    Column("jid", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("attempt", Integer),  # Sidekiq's count: retry_count + 2, 1 for the first run
    Column("finished_at", Float),
    Column("outcome", Text),  # the worker's outcome: ok, retry, dead, ...
    Column("error_class", Text),
    Column("error_message", Text),
    Column("worker", Text),
    Column("runtime", Float),
    # One row per run: a start and its end share (jid, started_at), so replays converge.
    PrimaryKeyConstraint("jid", "started_at", name="pk_gokiq_job_attempts"),
)
