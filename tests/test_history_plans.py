"""The listing's query plans on a real PostgreSQL with enough rows for the planner to choose:
a page with two filters (class and state, queue and state) is one range of an index that holds
both, with no table scan and no row read to be thrown away, and, when many rows match, read in
the sort order and only as far as the page goes (no sort)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from gokiq_history import migrations, store

from .history_support import pg_admin_url, pg_url

__all__ = ["pg_admin_url", "pg_url"]

ROWS = 60_000
# 47 classes (2% each), 3 queues (critical 2%, low 10%, default), states (10% dead, 1% retrying),
# each independent of the others (co-prime moduli). A filter that keeps most rows (default,
# succeeded) is no filter worth an index: PostgreSQL then walks the other filter's index and
# drops the few rows that do not match, which costs about as little.
LOAD = """
INSERT INTO gokiq_jobs (jid, job_class, queue, state, state_rank, state_at, attempts,
    created_at, updated_at)
SELECT md5(i::text), 'Class' || (i % 47),
    CASE WHEN i % 49 = 0 THEN 'critical' WHEN i % 49 <= 5 THEN 'low' ELSE 'default' END,
    CASE WHEN i % 97 = 0 THEN 'retrying' WHEN i % 10 = 0 THEN 'dead' ELSE 'succeeded' END,
    7, :now - i, 1, :now - i, :now - i
FROM generate_series(1, :rows) AS i
"""


@pytest.fixture(scope="module")
def engine(pg_url: str) -> Iterator:
    migrations.upgrade(pg_url)
    engine = store.open_engine(pg_url, statement_timeout=120)
    with engine.begin() as conn:
        conn.execute(text(LOAD), {"now": time.time(), "rows": ROWS})
    with engine.connect() as conn:
        conn.execute(text("ANALYZE gokiq_jobs"))
        conn.commit()
    yield engine
    engine.dispose()


def plan(engine, **listing: Any) -> dict[str, Any]:
    query = store.listing_query(**{"since": None, "until": None, "limit": 50, "cursor": None,
                                   **listing})  # fmt: skip
    sql = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        [[explained]] = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).all()
    return (explained if isinstance(explained, list) else json.loads(explained))[0]["Plan"]


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def the_scan(engine, **listing: Any) -> tuple[dict[str, Any], set[str]]:
    """The plan's one index scan, and every node type in the plan, after checking that the plan
    reads no whole table and throws no row away (a filter not in the index condition)."""
    found = list(nodes(plan(engine, **listing)))
    kinds = {node["Node Type"] for node in found}
    assert "Seq Scan" not in kinds, found
    assert not [node for node in found if "Filter" in node], found
    [scan] = [node for node in found if "Index Name" in node]
    return scan, kinds


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"job_class": "Class7", "state": "retrying"}, "ix_gokiq_jobs_class_state_created"),
        ({"job_class": "Class7", "state": "dead"}, "ix_gokiq_jobs_class_state_created"),
        ({"queue": "critical", "state": "dead"}, "ix_gokiq_jobs_queue_state_created"),
        ({"queue": "low", "state": "retrying"}, "ix_gokiq_jobs_queue_state_created"),
        ({"queue": "low", "state": "dead"}, "ix_gokiq_jobs_queue_state_created"),
    ],
)
def test_a_page_with_two_filters_is_one_range_of_an_index_on_both(engine, filters, index):
    cursor = store.encode_cursor(time.time() - ROWS / 3, "f" * 32)
    for extra in ({}, {"since": time.time() - ROWS / 2}, {"cursor": cursor}):
        listing = {"filters": {"job_class": None, "queue": None, **filters}, **extra}
        scan, kinds = the_scan(engine, **listing)
        assert scan["Index Name"] == index, scan
        for column in filters:  # both filters are index conditions
            assert column in scan["Index Cond"], scan
        # Many matches: the index is walked newest first and the walk stops at the page's end
        # (few: the planner may as well fetch them all through the index and sort them).
        if filters.get("queue") and filters["state"] == "dead":  # 600 rows match
            assert scan["Node Type"] in {"Index Scan", "Index Only Scan"}, scan
            assert scan["Scan Direction"] == "Backward" and "Sort" not in kinds, kinds


def test_one_filter_uses_its_own_index(engine):
    for column, value, index in (
        ("job_class", "Class3", "ix_gokiq_jobs_class_created"),
        ("queue", "low", "ix_gokiq_jobs_queue_created"),
        ("state", "dead", "ix_gokiq_jobs_state_created"),
    ):
        filters = {"job_class": None, "queue": None, "state": None, column: value}
        scan, kinds = the_scan(engine, filters=filters)
        assert scan["Index Name"] == index and column in scan["Index Cond"], scan
        assert "Sort" not in kinds, kinds
