"""Reliable fetch: jobs move atomically from `queue:<q>` into this bridge's in-flight list, and
leave it for the delivery ledger in one step before they are published (`hand_over`; the
ledger publishes again what no worker settles, gokiq_celery/sidekiq/ledger.py). A bridge that
dies leaves its in-flight lists behind; any other bridge gives them back to their queues once
the dead one's heartbeat expires.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from gokiq_celery.messages import new_delivery_token
from gokiq_celery.settings import QueueSpec
from gokiq_celery.sidekiq.job import InvalidJob, Job, poison_entry
from gokiq_celery.sidekiq.store import SidekiqStore


class QueueOrder:
    """The order in which queues are tried on each fetch, as Sidekiq does it
    (docs/sidekiq-protocol.md §6).

    Strict (`--strict`, or no queue has a weight): always the declared order, so a busy first
    queue starves the others. Weighted: each queue appears max(weight, 1) times, the list is
    shuffled on every fetch and only the first occurrence of each name is kept, so a queue
    comes first with probability weight / total weight.
    """

    def __init__(
        self, specs: Sequence[QueueSpec], strict: bool = False, rng: random.Random | None = None
    ) -> None:
        self.names = list(dict.fromkeys(spec.name for spec in specs))
        self.strict = strict or all(spec.weight == 0 for spec in specs)
        self.expanded = [spec.name for spec in specs for _ in range(max(spec.weight, 1))]
        self.rng = rng or random.Random()

    def next(self) -> list[str]:
        if self.strict:
            return list(self.names)
        shuffled = list(self.expanded)
        self.rng.shuffle(shuffled)
        return list(dict.fromkeys(shuffled))


@dataclass
class Batch:
    """Jobs fetched from one queue together; they sit in the in-flight list until handed over."""

    queue: str
    raws: list[bytes]
    jobs: list[Job] = field(default_factory=list)
    job_raws: list[bytes] = field(default_factory=list)  # the exact bytes of each job
    poison: list[tuple[bytes, str]] = field(default_factory=list)  # (raw, reason)
    # Delivery tokens, one per job, made once: a hand-over that is retried uses the same ones.
    tokens: list[str] = field(default_factory=list)
    handed_over: bool = False
    published: bool = False

    def __post_init__(self) -> None:
        for raw in self.raws:
            try:
                self.jobs.append(Job.parse(raw))
                self.job_raws.append(raw)
            except InvalidJob as exc:
                self.poison.append((raw, exc.reason))
        self.tokens = [new_delivery_token() for _ in self.jobs]

    def drop(self, indexes: Sequence[int]) -> list[Job]:
        """Forget the jobs at `indexes` (no longer this bridge's to deliver); returns them."""
        if not indexes:
            return []
        gone = set(indexes)
        dropped = [job for i, job in enumerate(self.jobs) if i in gone]
        for name in ("jobs", "job_raws", "tokens"):
            setattr(self, name, [x for i, x in enumerate(getattr(self, name)) if i not in gone])
        return dropped

    def __len__(self) -> int:
        return len(self.raws)


class ReliableFetcher:
    """Moves jobs from Sidekiq's queues into (and out of) one bridge's in-flight lists."""

    def __init__(self, store: SidekiqStore, bridge_id: str, queues: Sequence[str]) -> None:
        self.store = store
        self.bridge_id = bridge_id
        self.queues = list(queues)

    def fetch(self, order: Sequence[str], limit: int) -> Batch | None:
        """Up to `limit` jobs from the first non-empty queue of `order`; None when all are empty.

        Never blocks: a Lua script cannot block, and BLMOVE only watches one list. When nothing
        came back the caller waits with `wait` (see `Bridge.IDLE_WAIT`).
        """
        found = self.store.queues.fetch_jobs(self.bridge_id, order, limit)
        if found is None:
            return None
        queue, raws = found
        return Batch(queue, raws)

    def wait(self, order: Sequence[str], timeout: float) -> Batch | None:
        """Block up to `timeout` seconds for a job on the first queue of `order`: an idle bridge
        picks a job up as soon as it is pushed, as Sidekiq's BRPOP does, instead of on its next
        poll. The other queues are read by the next `fetch`, `timeout` later at most."""
        raw = self.store.queues.wait_job(self.bridge_id, order[0], timeout)
        return None if raw is None else Batch(order[0], [raw])

    def hand_over(self, batch: Batch, deadline: float) -> list[Job]:
        """Move the batch's jobs from in-flight into the delivery ledger under their tokens, in
        one step, before publishing: from then on a lost message is published again. Returns
        the jobs this bridge no longer held (recovered by another bridge while this one
        stalled), now dropped from the batch."""
        deliveries = list(zip(batch.tokens, batch.job_raws, strict=True))
        missing = self.store.ledger.hand_over(self.bridge_id, batch.queue, deliveries, deadline)
        batch.handed_over = True
        return batch.drop(missing)

    def bury(self, queue: str, raw: bytes, reason: str) -> None:
        """Not a job: to the dead set (saying why) and out of the in-flight list, atomically."""
        self.store.queues.bury_inflight(self.bridge_id, queue, raw, entry=poison_entry(raw, reason))

    def inflight_count(self) -> int:
        return self.store.queues.inflight_count(self.bridge_id, self.queues)

    def register(self, ttl: float) -> None:
        """Announce this bridge (also its heartbeat: call it well within `ttl`)."""
        self.store.bridges.register(self.bridge_id, self.queues, ttl)

    def release(self) -> int:
        """Clean shutdown: every job this bridge still holds goes back (in-flight ones to the
        tail of their queue, so they run next), and the bridge is forgotten."""
        return self.store.bridges.release(self.bridge_id)

    def recover_dead_bridges(self) -> dict[str, int]:
        """Give back the jobs of every bridge whose heartbeat has expired: {bridge id: jobs}."""
        return self.store.bridges.recover_dead()
