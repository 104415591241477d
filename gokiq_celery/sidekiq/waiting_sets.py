"""Reading what waits in Sidekiq's `schedule` and `retry` sets a slice at a time (the job
history's watcher, bridge/waiting.py), without taking anything out of them.

The sets are keyed by due time, not by when a member was added: a job pushed with a due time a
month away lands anywhere in the set, so "what was added since the last look" has no range to
ask for. ZSCAN does: a full iteration (from cursor 0 back to 0) returns every member that was
in the set throughout it, whatever its score, at a cost per call bounded by COUNT; a member
added during one iteration is returned by it or by the next (reference: Redis' SCAN
guarantees). A small set (listpack-encoded) comes back whole in one call.
"""

from __future__ import annotations

from .store import SCHEDULED_SETS, SidekiqStore

WaitingSlice = tuple[int, list[tuple[bytes, float]]]


def scan_waiting(store: SidekiqStore, set_name: str, cursor: int, count: int) -> WaitingSlice:
    """The next slice of `set_name` (`schedule` or `retry`) from `cursor` (0: from the start):
    the cursor to continue from (0: the iteration is complete) and (member, score) pairs."""
    if set_name not in SCHEDULED_SETS:
        raise ValueError(f"not a scheduled set: {set_name!r}")
    cursor, members = store.redis.zscan(set_name, cursor, count=count)
    return int(cursor), members


def waiting_size(store: SidekiqStore, set_name: str) -> int:
    """ZCARD of `set_name`: how large a slice keeps a whole iteration short."""
    if set_name not in SCHEDULED_SETS:
        raise ValueError(f"not a scheduled set: {set_name!r}")
    return int(store.redis.zcard(set_name))
