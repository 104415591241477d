"""The history database: engine, merged upserts, retention and the API's queries.

One module for both databases: SQLAlchemy's PostgreSQL and SQLite `insert` both have
`on_conflict_do_update`; only the two-argument min/max is spelled differently.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    Engine,
    Float,
    Select,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    literal_column,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite

from .rows import ATTEMPT_COLUMNS, JOB_COLUMNS
from .schema import attempts, jobs

_PG_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg"}


def engine_url(url: str) -> str:
    """`postgresql://` as psycopg 3 (SQLAlchemy's default driver would be psycopg2)."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in _PG_SCHEMES else url


def is_supported_url(url: str) -> bool:
    return urlsplit(url).scheme in _PG_SCHEMES | {"sqlite"}


def open_engine(
    url: str,
    *,
    statement_timeout: float = 5.0,
    pool_size: int = 2,
    pre_ping: bool = True,
    read_only: bool = False,
) -> Engine:
    """An engine that gives up quickly on a database that is down or stalled. `read_only`:
    autocommit, so a query is one round trip (no BEGIN, no ROLLBACK when the pool takes the
    connection back)."""
    url = engine_url(url)
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if read_only else {}
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": statement_timeout}, paramstyle="named", **options
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    millis = int(statement_timeout * 1000)
    return create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        **options,
        connect_args={"connect_timeout": 3, "options": f"-c statement_timeout={millis}"},
    )


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: the API reads while the bridge and the workers write, each its own process.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _insert(engine: Engine, table, columns: tuple[str, ...]):
    """An INSERT of a batch of rows. PostgreSQL: one statement over one array per column
    (`unnest`), run once; SQLite: a row's VALUES, run as the driver's executemany."""
    if engine.dialect.name != "postgresql":
        return sqlite.insert(table)
    arrays = [bindparam(name, type_=postgresql.ARRAY(table.c[name].type)) for name in columns]
    rows = func.unnest(*arrays).table_valued(*columns).render_derived(name="batch")
    return postgresql.insert(table).from_select(columns, select(*(rows.c[n] for n in columns)))


def _batch_parameters(engine: Engine, rows: list[dict[str, Any]], table, columns: tuple[str, ...]):
    """The rows as `_insert`'s statement takes them: one array per column on PostgreSQL, sent
    in binary (`_compiled`), whose dumper follows an array's first value: a time that is an int
    (1700000000) would make a float array's other values ints, so times are made floats.

    A column that is null in every row is sent as an empty array: `unnest` pads the shorter
    arrays with nulls (the key columns are never null, so one array is always whole). psycopg
    dumps an array a value at a time in Python, and half the columns of a submitted job's row
    (its runs, its errors) are null: they were half the writer's CPU at bulk rates."""
    if engine.dialect.name != "postgresql":
        return rows
    floats = _float_columns(table)
    arrays: dict[str, list[Any]] = {}
    for name in columns:
        values = [row[name] for row in rows]
        nulls = values.count(None)
        if nulls == len(values):
            values = []
        elif name in floats:
            values = (
                [None if v is None else float(v) for v in values]
                if nulls
                else [*map(float, values)]
            )
        arrays[name] = values
    return arrays


@functools.cache
def _float_columns(table) -> tuple[str, ...]:
    return tuple(c.name for c in table.c if isinstance(c.type, Float))


def _least(engine: Engine, a, b):
    """min(a, b) ignoring NULLs, like PostgreSQL's LEAST (SQLite's min(a, b) returns NULL)."""
    if engine.dialect.name == "postgresql":
        return func.least(a, b)
    return func.min(func.coalesce(a, b), func.coalesce(b, a))


def _greatest(engine: Engine, a, b):
    if engine.dialect.name == "postgresql":
        return func.greatest(a, b)
    return func.max(func.coalesce(a, b), func.coalesce(b, a))


def upsert_jobs(engine: Engine, conn, rows: list[dict[str, Any]]) -> None:
    """Merge job events into `gokiq_jobs` (the rule of `rows.merge_job`); rows: distinct jids."""
    if rows:
        conn.exec_driver_sql(
            _job_upsert_sql(engine), _batch_parameters(engine, rows, jobs, JOB_COLUMNS)
        )


def upsert_attempts(engine: Engine, conn, rows: list[dict[str, Any]]) -> None:
    """Merge run events into `gokiq_job_attempts`: a known value is never erased."""
    if rows:
        parameters = _batch_parameters(engine, rows, attempts, ATTEMPT_COLUMNS)
        conn.exec_driver_sql(_attempt_upsert_sql(engine), parameters)


# The upserts are compiled once per engine and run as the driver's statement with the rows as
# they are: SQLAlchemy's per-row parameter processing cost ~40 µs a row, psycopg's executemany
# ~17 (one prepared execution per row), its arrays for one `unnest` statement a few.


@functools.lru_cache(maxsize=8)
def _job_upsert_sql(engine: Engine) -> str:
    stmt = _insert(engine, jobs, JOB_COLUMNS)
    new, old = stmt.excluded, jobs.c
    wins = tuple_(new.state_rank, new.state_at) > tuple_(old.state_rank, old.state_at)
    newer_error = new.error_at > func.coalesce(old.error_at, literal_column("-1e300"))

    def lead(name: str):  # the winning event's value; a null never erases one
        return case(
            (wins, func.coalesce(new[name], old[name])), else_=func.coalesce(old[name], new[name])
        )

    def follow(name: str, condition):
        return case((condition, new[name]), else_=old[name])

    update = {
        "job_class": func.coalesce(old.job_class, new.job_class),
        "queue": lead("queue"),
        "args": func.coalesce(new.args, old.args),
        "state": follow("state", wins),
        "state_rank": follow("state_rank", wins),
        "state_at": follow("state_at", wins),
        "attempts": _greatest(engine, old.attempts, new.attempts),
        "created_at": _least(engine, old.created_at, new.created_at),
        "enqueued_at": _least(engine, old.enqueued_at, new.enqueued_at),
        "due_at": lead("due_at"),
        "first_started_at": _least(engine, old.first_started_at, new.first_started_at),
        "last_started_at": _greatest(engine, old.last_started_at, new.last_started_at),
        "finished_at": follow("finished_at", wins),
        "error_class": follow("error_class", newer_error),
        "error_message": follow("error_message", newer_error),
        "error_at": follow("error_at", newer_error),
        "worker": lead("worker"),
        "runtime": lead("runtime"),
        "updated_at": _greatest(engine, old.updated_at, new.updated_at),
    }
    assert set(update) == set(JOB_COLUMNS) - {"jid"}
    # An event that changes nothing (a replay; the bridge's `enqueued` written after the run's
    # end, about one job in two as the processes flush on their own clocks) writes no new row
    # version: a new version is a new entry in each of the table's indexes.
    changes = or_(*(value.is_distinct_from(old[name]) for name, value in update.items()))
    upsert = stmt.on_conflict_do_update(index_elements=[jobs.c.jid], set_=update, where=changes)
    return _compiled(engine, upsert)


@functools.lru_cache(maxsize=8)
def _attempt_upsert_sql(engine: Engine) -> str:
    stmt = _insert(engine, attempts, ATTEMPT_COLUMNS)
    update = {
        name: func.coalesce(stmt.excluded[name], attempts.c[name])
        for name in ATTEMPT_COLUMNS
        if name not in {"jid", "started_at"}
    }
    keys = [attempts.c.jid, attempts.c.started_at]
    return _compiled(engine, stmt.on_conflict_do_update(index_elements=keys, set_=update))


def _compiled(
    engine: Engine, stmt, columns: Iterable[str] = (*JOB_COLUMNS, *ATTEMPT_COLUMNS)
) -> str:
    """The statement in the driver's parameter style, its parameters named after the columns:
    %(jid)s for psycopg, :jid for sqlite3 (`paramstyle="named"` in `open_engine`)."""
    compiled = stmt.compile(dialect=engine.dialect)
    assert set(compiled.params) <= set(columns), compiled.params
    sql = str(compiled)
    if engine.dialect.name == "postgresql":  # binary parameters: psycopg dumps arrays faster
        for name in compiled.params:
            sql = sql.replace(f"%({name})s", f"%({name})b")
    return sql


def insert_rows(
    engine: Engine, table, columns: tuple[str, ...], rows: list[dict[str, Any]]
) -> None:
    """Append rows to a table without a conflict rule (the ingestion audit), whole or not at all:
    on PostgreSQL one `unnest` statement in binary and autocommit (2-4 µs of CPU a row, where
    SQLAlchemy Core's executemany, multi-row VALUES, cost 11-14); on SQLite executemany."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            conn.execute(_insert(engine, table, columns), rows)
        return
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        parameters = _batch_parameters(engine, rows, table, columns)
        conn.exec_driver_sql(_insert_sql(engine, table, columns), parameters)


@functools.lru_cache(maxsize=8)
def _insert_sql(engine: Engine, table, columns: tuple[str, ...]) -> str:
    return _compiled(engine, _insert(engine, table, columns), columns)


def delete_older_than(engine: Engine, cutoff: float, batch: int) -> int:
    """Delete up to `batch` jobs not updated since `cutoff`, with their runs; how many went."""
    with engine.begin() as conn:
        jids = conn.scalars(select(jobs.c.jid).where(jobs.c.updated_at < cutoff).limit(batch))
        jids = list(jids)
        if jids:
            conn.execute(delete(attempts).where(attempts.c.jid.in_(jids)))
            conn.execute(delete(jobs).where(jobs.c.jid.in_(jids)))
    return len(jids)


# -- reading: the API's queries ------------------------------------------------------------


class BadCursor(ValueError):
    """A `cursor` that this API did not hand out."""


def encode_cursor(created_at: float, jid: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, jid]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, jid = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(jid, str) or isinstance(created_at, bool):
            raise TypeError
        return float(created_at), jid
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise BadCursor(cursor) from None


def get_job(engine: Engine, jid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The job's row and its runs (oldest first), or None: one query, one round trip."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(_job_query_sql(engine), {"jid": jid}).fetchall()
    if not rows:
        return None
    job_width = len(jobs.c)
    job = dict(zip(jobs.c.keys(), rows[0][:job_width], strict=True))
    run_names = attempts.c.keys()
    runs = [dict(zip(run_names, row[job_width:], strict=True)) for row in rows]
    return job, [run for run in runs if run["jid"] is not None]


@functools.lru_cache(maxsize=8)
def _job_query_sql(engine: Engine) -> str:
    """`get_job`'s query, compiled once and run as the driver's statement: building and
    compiling the select, and SQLAlchemy's result mapping, were most of a lookup's CPU."""
    query = (
        select(jobs, *attempts.c)
        .select_from(jobs.outerjoin(attempts, attempts.c.jid == jobs.c.jid))
        .where(jobs.c.jid == bindparam("jid", type_=jobs.c.jid.type))
        .order_by(attempts.c.started_at)
    )
    return str(query.compile(dialect=engine.dialect))


def list_jobs(
    engine: Engine,
    *,
    filters: dict[str, str | None],
    since: float | None,
    until: float | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first by (created_at, jid); at most `limit` rows and the next page's cursor."""
    query = listing_query(filters=filters, since=since, until=until, limit=limit, cursor=cursor)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]["created_at"], rows[-1]["jid"]) if more else None


def listing_query(
    *,
    filters: dict[str, str | None],
    since: float | None,
    until: float | None,
    limit: int,
    cursor: str | None,
) -> Select:
    """The page `list_jobs` reads (one row more than `limit`: is there a next page?).

    Each filter (job_class, queue, state), and state with either of the others, has an index
    led by it and followed by the sort key, so the database walks one index range from the
    cursor and stops after `limit` matches (tests/test_history_plans.py checks the plans).
    """
    conditions = [jobs.c[name] == value for name, value in filters.items() if value is not None]
    if since is not None:
        conditions.append(jobs.c.created_at >= since)
    if until is not None:
        conditions.append(jobs.c.created_at < until)
    if cursor is not None:
        at, jid = decode_cursor(cursor)
        conditions.append(tuple_(jobs.c.created_at, jobs.c.jid) < tuple_(at, jid))
    return (
        select(jobs)
        .where(and_(True, *conditions))
        .order_by(jobs.c.created_at.desc(), jobs.c.jid.desc())
        .limit(limit + 1)
    )


def stats(engine: Engine, since: float) -> list[tuple[str, str, int]]:
    """(class, state, count) of the jobs created since `since` (a range of the created index)."""
    query = (
        select(jobs.c.job_class, jobs.c.state, func.count())
        .where(jobs.c.created_at >= since)
        .group_by(jobs.c.job_class, jobs.c.state)
        .order_by(jobs.c.job_class, jobs.c.state)
    )
    with engine.connect() as conn:
        return [(c or "", s, n) for c, s, n in conn.execute(query)]


def write_batch(
    engine: Engine, job_rows: Iterable[dict[str, Any]], attempt_rows: Iterable[dict[str, Any]]
) -> None:
    """A batch is written whole or not at all (and then retried whole). PostgreSQL: one
    statement (`_batch_upsert_sql`) in autocommit, one round trip; SQLite: a transaction."""
    job_rows, attempt_rows = list(job_rows), list(attempt_rows)
    if engine.dialect.name == "postgresql":
        parameters = _batch_parameters(engine, job_rows, jobs, JOB_COLUMNS)
        runs = _batch_parameters(engine, attempt_rows, attempts, ATTEMPT_COLUMNS)
        parameters.update((RUN_PREFIX + name, values) for name, values in runs.items())
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(_batch_upsert_sql(engine), parameters)
        return
    with engine.begin() as conn:
        upsert_jobs(engine, conn, job_rows)
        upsert_attempts(engine, conn, attempt_rows)


RUN_PREFIX = "run_"  # the attempts' arrays in `_batch_upsert_sql` (their names clash: jid...)


@functools.lru_cache(maxsize=8)
def _batch_upsert_sql(engine: Engine) -> str:
    """Both upserts as one PostgreSQL statement (a data-modifying WITH runs to completion
    whether or not the rest reads it): atomic, and a batch costs one round trip instead of
    BEGIN, two statements and COMMIT."""
    runs = _attempt_upsert_sql(engine)
    for name in ATTEMPT_COLUMNS:
        runs = runs.replace(f"%({name})b", f"%({RUN_PREFIX}{name})b")
    return f"WITH written_jobs AS ({_job_upsert_sql(engine)}) {runs}"


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(select(1))
