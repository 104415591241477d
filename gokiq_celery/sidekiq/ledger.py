"""The delivery ledger: what the broker holds on gokiq's behalf, until a worker settles it.

The invariant (README, "Reliability: where a job is at every moment"): every `gokiq.perform`
message that may still run has an entry here, under the token the message carries, entered
*before* the message is published and removed only once the job's fate is stored (done,
retry set, dead set). So a job is always in Redis, in one of Sidekiq's queues or sets, a
bridge's in-flight or moving list, or this ledger, and a lost message costs a re-publish,
never the job. A message whose token is no longer here is stale and skipped: each entry runs
at most once per token.

The one API, used by the bridge and the workers:
- `hand_over`: the bridge moves a fetched batch from its in-flight list into the ledger, each
  job under a fresh token with a deadline, atomically (lua/hand_over.lua); only then does it
  publish, and `extend` pushes the deadline to `delivery_timeout` once the broker has them.
- `claim`: a worker starts a delivery; the claim moves the deadline to the end of the run
  window and names the worker process (`claim_retry` for a countdown retry, below).
- `fail_into_retry_set` (re-token): a failed run's entry is settled and the job waits in
  Sidekiq's `retry` set; its Celery countdown carries a new token that enters the ledger only
  if `claim_retry` takes the job's exact member out of the set first (lua/claim_retry.lua).
- `settle`: the job's fate is stored; the entries go and the runs are counted in Sidekiq's
  stats (stats.count_runs), in one transaction.
- `take_overdue`: entries whose deadline passed (a message lost with a SIGKILLed worker, one a
  Redis broker holds unacked for its visibility timeout, a broker that lost its data) are
  re-tokened for the bridge to publish again (lua/take_overdue_deliveries.lua).

Each worker process that claims keeps a sign of life in `gokiq:workers` (a claim, or
`beat_worker` every WORKER_BEAT s); one silent for WORKER_TTL is dead, and
`recover_dead_workers` makes its deliveries due now (lua/recover_workers.lua).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from .job import Job
from .keys import (
    DELIVERIES,
    DELIVERY_DEADLINES,
    DELIVERY_HOLDERS,
    RETRY,
    WORKERS,
    inflight_key,
)
from .redis_client import Scripts, score
from .scheduled import ScheduledSets
from .stats import count_runs

WORKER_TTL = 15.0
WORKER_BEAT = 3.0


def _entry(queue: str, payload: str) -> bytes:
    """`<byte length of queue>:<queue><payload>`: no encoding of the payload, any queue name
    (hand_over.lua writes the same form)."""
    name = queue.encode()
    return b"%d:%s%s" % (len(name), name, payload.encode())


def _parse_entry(entry: bytes) -> tuple[str, str]:
    length, rest = entry.split(b":", 1)
    return rest[: int(length)].decode(), rest[int(length) :].decode()


class DeliveryLedger:
    def __init__(self, client: redis.Redis, scripts: Scripts, scheduled: ScheduledSets) -> None:
        self.redis = client
        self.scripts = scripts
        self.scheduled = scheduled

    # -- the bridge -------------------------------------------------------------------------

    def hand_over(
        self, bridge_id: str, queue: str, deliveries: Sequence[tuple[str, bytes]], deadline: float
    ) -> list[int]:
        """The bridge's jobs, as (token, exact bytes), leave its in-flight list for the ledger,
        in one script call. Returns the indexes of those it no longer held (another bridge gave
        them back to their queue): they were not entered and must not be published."""
        args: list[str | bytes] = [score(deadline), queue]
        for token, raw in deliveries:
            args += [token, raw]
        keys = [DELIVERIES, DELIVERY_DEADLINES, inflight_key(bridge_id, queue)]
        return [int(i) - 1 for i in self.scripts("hand_over")(keys=keys, args=args)]

    def record(self, deliveries: Sequence[tuple[str, str, str]], deadline: float) -> None:
        """Enter (token, queue, payload) triples, due to be presumed lost at `deadline` (what
        `hand_over` does for jobs that are in no in-flight list)."""
        if not deliveries:
            return
        entries = {token: _entry(queue, payload) for token, queue, payload in deliveries}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(DELIVERIES, mapping=entries)
            pipe.zadd(DELIVERY_DEADLINES, dict.fromkeys(entries, score(deadline)))
            pipe.execute()

    def extend(self, tokens: Sequence[str], deadline: float) -> None:
        """Push deadlines out to `deadline`, never in (a worker's claim may already be later)."""
        if tokens:
            self.redis.zadd(
                DELIVERY_DEADLINES, dict.fromkeys(tokens, score(deadline)), xx=True, gt=True
            )

    def take_overdue(
        self, now: float, fresh_tokens: Sequence[str], deadline: float
    ) -> list[tuple[str, str, str]]:
        """Re-token up to len(fresh_tokens) overdue entries, atomically (safe with many
        bridges): returns (new token, queue, payload) to publish again."""
        keys = [DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS]
        args = [score(now), score(deadline), *fresh_tokens]
        flat = self.scripts("take_overdue_deliveries")(keys=keys, args=args)
        return [
            (token.decode(), *_parse_entry(entry))
            for token, entry in zip(flat[::2], flat[1::2], strict=True)
        ]

    def recover_dead_workers(
        self, delivery_timeout: float, now: float | None = None
    ) -> tuple[int, list[str]]:
        """Hand back the deliveries of worker processes silent for WORKER_TTL (see
        lua/recover_workers.lua): returns (deliveries handed back, dead processes)."""
        now = time.time() if now is None else now
        keys = [WORKERS, DELIVERY_DEADLINES, DELIVERY_HOLDERS]
        args = [score(now), score(WORKER_TTL), score(delivery_timeout)]
        count, *dead = self.scripts("recover_workers")(keys=keys, args=args)
        return int(count), [holder.decode() for holder in dead]

    # -- the workers ------------------------------------------------------------------------

    def claim(self, token: str, deadline: float, holder: str) -> bool:
        """Worker process `holder` starts a delivery: False if the token is stale (settled or
        re-published)."""
        keys = [DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS, WORKERS]
        args = [token, score(deadline), holder, score(time.time())]
        return bool(self.scripts("claim_delivery")(keys=keys, args=args))

    def claim_retry(
        self, member: str, token: str, queue: str, deadline: float, holder: str
    ) -> bool:
        """A countdown retry fires: take its exact member out of `retry` and enter `token` in
        the ledger, held by `holder` (lua/claim_retry.lua). False: someone else took or removed
        the entry (the poller, Retry Now, Delete, Kill): the message is stale."""
        keys = [RETRY, DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS, WORKERS]
        args = [member, token, queue, score(deadline), holder, score(time.time())]
        return bool(self.scripts("claim_retry")(keys=keys, args=args))

    def fail_into_retry_set(self, old: str | None, job: Job, at: float) -> None:
        """A short retry: the failed run's delivery is settled and counted as a failed run, and
        the retry waits in `retry` until `at`, in one transaction. Its Celery countdown then
        claims it under a new token (`claim_retry`)."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._forget(pipe, [old] if old else [])
            self.scheduled.schedule_retry_in(pipe, job, at)
            count_runs(pipe, processed=1, failed=1)
            pipe.execute()

    def settle(
        self, tokens: Sequence[str], *, processed: int = 0, failed: int = 0, now=None
    ) -> None:
        """Deliveries are done (their jobs' fates are stored): their entries go, and the runs
        are counted in Sidekiq's stats (`stat:processed`, `stat:failed`, and the day's), in one
        transaction."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._forget(pipe, tokens)
            count_runs(pipe, processed, failed, now)
            pipe.execute()

    def beat_worker(self, holder: str) -> None:
        """A sign of life of a worker process between claims (a long job, an idle worker)."""
        self.redis.zadd(WORKERS, {holder: score(time.time())})

    def leave_workers(self, holder: str) -> None:
        """A clean exit: what the process held is settled, nothing to hand back."""
        self.redis.zrem(WORKERS, holder)

    def _forget(self, pipe: redis.client.Pipeline, tokens: Sequence[str]) -> None:
        if tokens:
            pipe.hdel(DELIVERIES, *tokens)
            pipe.zrem(DELIVERY_DEADLINES, *tokens)
            pipe.hdel(DELIVERY_HOLDERS, *tokens)

    # -- reading (gauges, operators, tests) -------------------------------------------------

    def pending(self) -> int:
        return self.redis.zcard(DELIVERY_DEADLINES)

    def tokens(self) -> list[str]:
        return sorted(token.decode() for token in self.redis.hkeys(DELIVERIES))
