"""What a history event is, and how two events about one job merge (pure Python, no database).

Events arrive late, twice, and out of order (the bridge and each worker flush on their own
clocks, and a batch that failed is written again), so a row is never "set", it is merged:

- the state group (state, finished_at) follows the event with the greatest (state_rank,
  state_at), where state_rank = 4 x the run's attempt number + the state's rank: a later
  attempt always wins (a retry enqueued, "Retry now" on a dead job), and within one attempt
  the states only move forward (enqueued < running < retrying or a final state), whatever the
  processes' clocks say (the bridge notes a fetch after publishing it, when the job may have
  run already); at equal ranks the later event wins;
- worker, queue, runtime and due_at follow that event too, but a null never erases a value;
- first/last start and `created_at` are a min/max, `attempts` a max;
- the error group follows the greatest `error_at`.

`merge_job` is that rule in Python (to fold a batch before it is written: one statement may
not touch a row twice); `store.upsert_jobs` is the same rule in SQL. Tests check they agree.
"""

from __future__ import annotations

from typing import Any

STATES = (
    "enqueued",
    "scheduled",
    "running",
    "succeeded",
    "retrying",
    "dead",
    "discarded",
    "dropped",
)
TERMINAL = frozenset({"succeeded", "dead", "discarded", "dropped"})
RANK = {"enqueued": 0, "scheduled": 0, "running": 1, "retrying": 2, **dict.fromkeys(TERMINAL, 3)}

# The worker's outcome of a run (`Outcome`, gokiq_celery/sidekiq/retry.py) -> the job's state
# afterwards. Outcomes not listed leave the job's state alone: "duplicate" (another delivery is
# running it), "unavailable" (put back on its queue, no retry spent: it shows "running" until
# its next run).
STATE_AFTER = {
    "ok": "succeeded",
    "retry": "retrying",
    "parked": "retrying",
    "dead": "dead",
    "dropped": "dropped",
    "discarded": "discarded",
}

JOB_COLUMNS = (
    "jid",
    "job_class",
    "queue",
    "args",
    "state",
    "state_rank",
    "state_at",
    "attempts",
    "created_at",
    "enqueued_at",
    "due_at",
    "first_started_at",
    "last_started_at",
    "finished_at",
    "error_class",
    "error_message",
    "error_at",
    "worker",
    "runtime",
    "updated_at",
)
ATTEMPT_COLUMNS = (
    "jid",
    "started_at",
    "attempt",
    "finished_at",
    "outcome",
    "error_class",
    "error_message",
    "worker",
    "runtime",
)
ERROR_MESSAGE_LIMIT = 2000
# Copied for each event: a copy costs a tenth of building the dict from its keys again.
_NO_JOB_VALUES = dict.fromkeys(JOB_COLUMNS)
_NO_ATTEMPT_VALUES = dict.fromkeys(ATTEMPT_COLUMNS)


def job_event(jid: str, state: str, at: float, attempt: int = 0, **values: Any) -> dict[str, Any]:
    """A job row update with every column present (absent ones None); `attempt`: the run the
    event is about (an enqueued job's: the run it waits for)."""
    row = _NO_JOB_VALUES.copy()
    rank = 4 * attempt + RANK[state]
    row.update(values, jid=jid, state=state, state_rank=rank, state_at=at, updated_at=at)
    if row["created_at"] is None:
        row["created_at"] = at
    if row["attempts"] is None:
        row["attempts"] = 0
    return row


def attempt_event(jid: str, started_at: float, **values: Any) -> dict[str, Any]:
    row = _NO_ATTEMPT_VALUES.copy()
    row.update(values, jid=jid, started_at=started_at)
    return row


def wins(new: dict[str, Any], old: dict[str, Any]) -> bool:
    return (new["state_rank"], new["state_at"]) > (old["state_rank"], old["state_at"])


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _least(a: Any, b: Any) -> Any:
    return min(v for v in (a, b) if v is not None) if _first(a, b) is not None else None


def _greatest(a: Any, b: Any) -> Any:
    return max(v for v in (a, b) if v is not None) if _first(a, b) is not None else None


def merge_job(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` applied to `old`, as `store.upsert_jobs` does it in SQL."""
    newer = wins(new, old)
    lead, other = (new, old) if newer else (old, new)
    error = new if (new["error_at"] or float("-inf")) > (old["error_at"] or float("-inf")) else old
    return {
        "jid": old["jid"],
        "job_class": _first(old["job_class"], new["job_class"]),
        "queue": _first(lead["queue"], other["queue"]),
        "args": _first(new["args"], old["args"]),
        "state": lead["state"],
        "state_rank": lead["state_rank"],
        "state_at": lead["state_at"],
        "attempts": max(old["attempts"], new["attempts"]),
        "created_at": _least(old["created_at"], new["created_at"]),
        "enqueued_at": _least(old["enqueued_at"], new["enqueued_at"]),
        "due_at": _first(lead["due_at"], other["due_at"]),
        "first_started_at": _least(old["first_started_at"], new["first_started_at"]),
        "last_started_at": _greatest(old["last_started_at"], new["last_started_at"]),
        "finished_at": lead["finished_at"],
        "error_class": error["error_class"],
        "error_message": error["error_message"],
        "error_at": error["error_at"],
        "worker": _first(lead["worker"], other["worker"]),
        "runtime": _first(lead["runtime"], other["runtime"]),
        "updated_at": max(old["updated_at"], new["updated_at"]),
    }


def merge_attempt(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One run's start and end events (same jid and started_at): what is known wins."""
    return {name: _first(new[name], old[name]) for name in ATTEMPT_COLUMNS}


def fold(events: list[dict[str, Any]], key: tuple[str, ...], merge) -> list[dict[str, Any]]:
    """Merge events that share `key` so that a batch touches each row once."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for event in events:
        k = tuple(event[name] for name in key)
        rows[k] = merge(rows[k], event) if k in rows else event
    return list(rows.values())
