"""Sidekiq's Redis data model: every key name and Lua script gokiq uses lives here.

Sidekiq's own keys (reference §2): `queue:<q>` lists and the `queues` set, the `schedule`,
`retry` and `dead` sorted sets, the `stat:*` counters, and the process registry (`processes`
and each identity's hashes and signals). gokiq's own keys all start with
`gokiq:` so they never collide with Sidekiq's, Pro's (`queue:sq|...`) or Enterprise's.
Nothing outside this module spells a key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pybreaker
import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from .job import Job
from .version import SidekiqVersion

QUEUES = "queues"
SCHEDULE = "schedule"
RETRY = "retry"
DEAD = "dead"
STAT_PROCESSED = "stat:processed"
STAT_FAILED = "stat:failed"
STAT_DAILY_TTL = 157_680_000  # five years, as Sidekiq sets it
# The process registry behind the Web UI's Busy page (reference §2.5): the `processes` set of
# identities, a hash per identity, a hash of running jobs per identity, a list of signals.
PROCESSES = "processes"
PROCESS_TTL = 60  # seconds; readers drop an identity whose hash has expired

# pybreaker's CircuitRedisStorage prefixes this with "pybreaker:".
BREAKER_NAMESPACE = "gokiq:sidecar"

# gokiq-bridge's own keys. A bridge registers its id in BRIDGES and keeps its heartbeat key
# alive; the jobs it holds live in its in-flight lists (one per queue, so recovery knows where
# each job came from) and its moving lists (due jobs on their way out of schedule/retry).
BRIDGES = "gokiq:bridges"

# The delivery ledger: every `gokiq.perform` message in the broker has an entry here, written
# before the message is published and removed when a worker has settled the job. A Redis broker
# can lose a message whose worker was SIGKILLed (kombu pops it before it records it as unacked)
# and holds the others for its visibility timeout; an entry whose deadline passes is published
# again under a new token, and a message whose token is no longer here is stale and skipped.
DELIVERIES = "gokiq:deliveries"  # hash: token -> {"queue": ..., "payload": job text}
DELIVERY_DEADLINES = "gokiq:deliveries:due"  # zset: token -> when to presume the message lost
# How many times the sidecar died while running a job (a counter per jid, with a TTL): a job
# that keeps killing it (exit!, OOM) is failed instead of being put back for ever.
SIDECAR_DEATHS_TTL = 3600
# Who claimed each delivery, and each claiming worker process's last sign of life (a claim, or
# a beat every WORKER_BEAT seconds): a process silent for WORKER_TTL is dead, and its
# deliveries are handed back at once (lua/recover_workers.lua), not at their deadline.
DELIVERY_HOLDERS = "gokiq:deliveries:holders"  # hash: token -> worker process
WORKERS = "gokiq:workers"  # zset: worker process -> last sign of life
WORKER_TTL = 15.0
WORKER_BEAT = 3.0
SCHEDULED_SETS = (RETRY, SCHEDULE)  # the poller's order: retries first, as Sidekiq does
# How long after its due time the bridge's poller leaves a retry to its Celery countdown (which
# claims it from the retry set when it fires, lua/claim_retry.lua): a live worker's timer runs
# it, and a dead worker's retry is still taken within this grace + the poll interval.
RETRY_GRACE = 5.0
# The app's `Sidekiq::VERSION`, written by every sidecar when it boots (see sidekiq/version.py).
SIDEKIQ_VERSION_KEY = "gokiq:sidekiq_version"

_LUA_DIR = Path(__file__).with_name("lua")


def queue_key(queue: str) -> str:
    return f"queue:{queue}"


def sidecar_deaths_key(jid: str) -> str:
    return f"gokiq:sidecar-deaths:{jid}"


def bridge_key(bridge_id: str) -> str:
    """The bridge's heartbeat: a string with a TTL; once it is gone, the bridge is dead."""
    return f"gokiq:bridge:{bridge_id}"


def bridge_queues_key(bridge_id: str) -> str:
    """The queues the bridge fetches from, i.e. where its in-flight lists may be."""
    return f"gokiq:bridge:{bridge_id}:queues"


def process_work_keys(identity: str, version: SidekiqVersion) -> list[str]:
    """The hash of a process's running jobs: `:workers` up to 6.4.1, `:work` from 6.4.2, so
    both for a version that does not say which (a bare "6")."""
    older = version.before(6, 4, 2)
    if older is None:
        return [f"{identity}:workers", f"{identity}:work"]
    return [f"{identity}:workers" if older else f"{identity}:work"]


def process_signals_key(identity: str) -> str:
    """Where `Sidekiq::Process#quiet!` / `#stop!` push TSTP / TERM for the process to pop."""
    return f"{identity}-signals"


def _inflight_prefix(bridge_id: str) -> str:
    return f"gokiq:inflight:{bridge_id}:"


def inflight_key(bridge_id: str, queue: str) -> str:
    return _inflight_prefix(bridge_id) + queue


def moving_key(bridge_id: str, set_name: str) -> str:
    """Due jobs the bridge took out of `set_name` and has not pushed onto a queue yet."""
    return f"gokiq:moving:{bridge_id}:{set_name}"


def _delivery_entry(queue: str, payload: str) -> bytes:
    """`<byte length of queue>:<queue><payload>`: no encoding of the payload, any queue name
    (hand_over.lua writes the same form)."""
    name = queue.encode()
    return b"%d:%s%s" % (len(name), name, payload.encode())


def _parse_delivery_entry(entry: bytes) -> tuple[str, str]:
    length, rest = entry.split(b":", 1)
    return rest[: int(length)].decode(), rest[int(length) :].decode()


def _score(epoch: float) -> str:
    # Sidekiq writes scores as float seconds; repr keeps full precision.
    return repr(float(epoch))


class SidekiqStore:
    """Reads and writes Sidekiq's data in one Redis, exactly as Sidekiq 6/7/8 would."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        dead_max_jobs: int = 10_000,
        dead_timeout_in_seconds: int = 15_552_000,
    ) -> None:
        self.redis = client
        self.dead_max_jobs = dead_max_jobs
        self.dead_timeout_in_seconds = dead_timeout_in_seconds
        self._scripts: dict[str, redis.commands.core.Script] = {}

    # Timeouts so that a stalled Redis raises (and is retried) instead of hanging a thread.
    SOCKET_TIMEOUT = 10.0
    CONNECT_TIMEOUT = 3.0
    # A Redis that restarts closes every connection, and refuses new ones until it has loaded
    # its data. A command caught in that (even one Redis ran, but whose reply was lost: a claim
    # of a delivery) is sent again on a new connection for ~15 s, not failed: a job whose claim
    # "failed" after Redis had written it would otherwise wait for its deadline (run_window).
    RECONNECT_RETRIES = 20

    @classmethod
    def _reconnecting(cls) -> Retry:
        backoff = EqualJitterBackoff(cap=1.0, base=0.1)
        return Retry(backoff, cls.RECONNECT_RETRIES, supported_errors=(redis.ConnectionError,))

    @classmethod
    def from_settings(cls, settings) -> SidekiqStore:  # settings: gokiq_celery.settings.Settings
        """The one way every process (bridge, worker, Flower) connects to Sidekiq's Redis."""
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=cls.SOCKET_TIMEOUT,
            socket_connect_timeout=cls.CONNECT_TIMEOUT,
            health_check_interval=30,
            retry=cls._reconnecting(),
        )
        return cls(
            client,
            dead_max_jobs=settings.dead_max_jobs,
            dead_timeout_in_seconds=settings.dead_timeout_in_seconds,
        )

    def script(self, name: str) -> redis.commands.core.Script:
        """The Lua script `lua/<name>.lua`, registered once (EVALSHA, reloaded on NOSCRIPT)."""
        if name not in self._scripts:
            source = (_LUA_DIR / f"{name}.lua").read_text()
            self._scripts[name] = self.redis.register_script(source)
        return self._scripts[name]

    # -- queues -----------------------------------------------------------------------------

    def push(self, queue: str, *payloads: str | bytes) -> None:
        """Enqueue as Sidekiq's client does: SADD `queues`, LPUSH onto the head (runs last)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(QUEUES, queue)
            pipe.lpush(queue_key(queue), *payloads)
            pipe.execute()

    def requeue(self, queue: str, payload: str | bytes) -> None:
        """Put a job back at the tail (runs next), original bytes, as Sidekiq's shutdown does."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(QUEUES, queue)
            pipe.rpush(queue_key(queue), payload)
            pipe.execute()

    def queue_names(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(QUEUES))

    def queue_size(self, queue: str) -> int:
        return self.redis.llen(queue_key(queue))

    def queue_jobs(self, queue: str) -> list[bytes]:
        return self.redis.lrange(queue_key(queue), 0, -1)

    def oldest_in_queue(self, queue: str) -> bytes | None:
        """The job that runs next (the list's tail), for latency as `Sidekiq::Queue#latency`."""
        return self.redis.lindex(queue_key(queue), -1)

    # -- schedule and retry sets -------------------------------------------------------------

    def schedule_retry(self, job: Job, at: float) -> None:
        """Park a failed job in `retry` until `at`; the bridge's poller re-enqueues it."""
        self.redis.zadd(RETRY, {job.text: _score(at)})

    def schedule(self, job: Job, at: float) -> None:
        """What `perform_at` does: the job waits in `schedule` until `at`."""
        self.schedule_payloads([(job.text, at)])

    def schedule_payloads(self, scheduled: Sequence[tuple[str, float]]) -> None:
        """`perform_at` for one job or a bulk push: (payload, at) pairs, one ZADD."""
        self.redis.zadd(SCHEDULE, {payload: _score(at) for payload, at in scheduled})

    def retry_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(RETRY, 0, -1, withscores=True)

    def scheduled_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(SCHEDULE, 0, -1, withscores=True)

    # -- dead set ----------------------------------------------------------------------------

    def add_dead(self, payload: str | bytes, now: float | None = None) -> None:
        """Sidekiq's `DeadSet#kill`: ZADD now, then trim by age and to `dead_max_jobs` - 1."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._add_dead(pipe, payload, now)
            pipe.execute()

    def _add_dead(self, pipe, payload: str | bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        pipe.zadd(DEAD, {payload: _score(now)})
        pipe.zremrangebyscore(DEAD, "-inf", f"({now - self.dead_timeout_in_seconds!r}")
        pipe.zremrangebyrank(DEAD, 0, -self.dead_max_jobs)

    def dead_set(self) -> list[tuple[bytes, float]]:
        return self.redis.zrange(DEAD, 0, -1, withscores=True)

    # -- stats -------------------------------------------------------------------------------

    def _count_runs(self, pipe, processed: int, failed: int, now: float | None = None) -> None:
        """Add to Sidekiq's all-time and per-UTC-day counters, as its heartbeat flush does."""
        day = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%d")
        for total, count in ((STAT_PROCESSED, processed), (STAT_FAILED, failed)):
            if count:
                pipe.incrby(total, count)
                pipe.incrby(f"{total}:{day}", count)
                pipe.expire(f"{total}:{day}", STAT_DAILY_TTL)

    def stats(self) -> dict[str, int]:
        processed, failed = self.redis.mget(STAT_PROCESSED, STAT_FAILED)
        return {"processed": int(processed or 0), "failed": int(failed or 0)}

    def set_sizes(self) -> dict[str, int]:
        """ZCARD of `schedule`, `retry` and `dead`, as `Sidekiq::Stats` shows them."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name in (SCHEDULE, RETRY, DEAD):
                pipe.zcard(name)
            return dict(zip((SCHEDULE, RETRY, DEAD), pipe.execute(), strict=True))

    # -- Sidekiq's process registry (the Busy page) ---------------------------------------------

    def beat_process(
        self,
        identity: str,
        fields: Mapping[str, str | int | float],
        work: Mapping[str, str],
        version: SidekiqVersion,
    ) -> str | None:
        """One heartbeat of a process on the Busy page, as Sidekiq's launcher writes it: the
        running jobs (`work`: tid -> JSON) replace the last beat's, the identity's hash gets
        `fields`, both live PROCESS_TTL seconds. Returns a signal sent to the process, if any."""
        work_keys = process_work_keys(identity, version)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.unlink(*work_keys)
            if work:
                for key in work_keys:
                    pipe.hset(key, mapping=work)
                    pipe.expire(key, PROCESS_TTL)
            pipe.sadd(PROCESSES, identity)
            pipe.hset(identity, mapping=fields)
            pipe.expire(identity, PROCESS_TTL)
            pipe.rpop(process_signals_key(identity))
            signal = pipe.execute()[-1]
        return signal.decode() if signal else None

    def unregister_process(self, identity: str, version: SidekiqVersion) -> None:
        """A clean exit, as Sidekiq's: out of `processes`, running jobs gone; the identity's
        hash is left to expire."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(PROCESSES, identity)
            pipe.unlink(*process_work_keys(identity, version))
            pipe.execute()

    def published_sidekiq_version(self) -> str | None:
        """`Sidekiq::VERSION` as the app's sidecar last published it, if one has."""
        value = self.redis.get(SIDEKIQ_VERSION_KEY)
        return value.decode() if value is not None else None

    def round_trip_us(self) -> int:
        """One PING's round trip in microseconds (the Busy page's RTT)."""
        started = time.perf_counter()
        self.redis.ping()
        return int((time.perf_counter() - started) * 1e6)

    # -- gokiq-bridge: registry and heartbeat --------------------------------------------------

    def register_bridge(self, bridge_id: str, queues: Iterable[str], ttl: float) -> None:
        """Announce (or re-announce, as a heartbeat) a live bridge and the queues it fetches.

        Re-adding the id each time means a bridge that was presumed dead after a long stall
        (and whose jobs were recovered) is registered again, so its next jobs are protected.
        """
        queues = list(queues)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(BRIDGES, bridge_id)
            pipe.set(bridge_key(bridge_id), str(time.time()), px=max(int(ttl * 1000), 1))
            if queues:
                pipe.sadd(bridge_queues_key(bridge_id), *queues)
            pipe.execute()

    def bridge_ids(self) -> list[str]:
        return sorted(member.decode() for member in self.redis.smembers(BRIDGES))

    def bridge_alive(self, bridge_id: str) -> bool:
        return bool(self.redis.exists(bridge_key(bridge_id)))

    def release_bridge(self, bridge_id: str, *, only_if_dead: bool = False) -> int:
        """Give back all a bridge holds (in-flight jobs to the tail of their queue, moving jobs to
        their set, due now) and forget the bridge. Returns the number of jobs given back, or -1
        when `only_if_dead` and the bridge's heartbeat still exists."""
        args: list[str] = [
            bridge_id,
            _inflight_prefix(bridge_id),
            queue_key(""),
            _score(time.time()),
            "1" if only_if_dead else "0",
        ]
        for set_name in SCHEDULED_SETS:
            args += [set_name, moving_key(bridge_id, set_name)]
        keys = [BRIDGES, QUEUES, bridge_key(bridge_id), bridge_queues_key(bridge_id)]
        return int(self.script("release_bridge")(keys=keys, args=args))

    def recover_dead_bridges(self) -> dict[str, int]:
        """Release every registered bridge whose heartbeat has expired: {bridge id: jobs}."""
        recovered = {}
        for bridge_id in self.bridge_ids():
            if self.bridge_alive(bridge_id):
                continue
            count = self.release_bridge(bridge_id, only_if_dead=True)
            if count >= 0:
                recovered[bridge_id] = count
        return recovered

    # -- gokiq-bridge: reliable fetch ------------------------------------------------------

    def fetch_jobs(
        self, bridge_id: str, queues: Sequence[str], limit: int
    ) -> tuple[str, list[bytes]] | None:
        """Atomically move up to `limit` jobs from the first non-empty queue (in the given
        order) into the bridge's in-flight list for it. Returns (queue, jobs in run order)."""
        keys = []
        for queue in queues:
            keys += [queue_key(queue), inflight_key(bridge_id, queue)]
        if not keys:
            return None
        result = self.script("fetch_jobs")(keys=keys, args=[limit])
        if not result:
            return None
        return queues[int(result[0]) - 1], list(result[1:])

    def wait_job(self, bridge_id: str, queue: str, timeout: float) -> bytes | None:
        """Block up to `timeout` seconds for one job on `queue` and move it into the bridge's
        in-flight list as `fetch_jobs` does (queue's tail to the list's head), in one command
        (BLMOVE, Redis >= 6.2). None when nothing came."""
        return self.redis.blmove(
            queue_key(queue), inflight_key(bridge_id, queue), timeout, "RIGHT", "LEFT"
        )

    def bury_inflight(
        self, bridge_id: str, queue: str, raw: bytes, reason: str = "", entry: bytes = b""
    ) -> None:
        """A fetched payload that is not a job: into the dead set (as `entry`, default the exact
        bytes read), and out of the in-flight list, in one transaction."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._add_dead(pipe, entry or raw)
            pipe.lrem(inflight_key(bridge_id, queue), 1, raw)
            pipe.execute()

    def held_by_bridges(self) -> dict[str, int]:
        """Every bridge in-flight or moving list in Redis, with its length (SCAN: for
        operators and tests, not for hot paths)."""
        held = {}
        for pattern in (inflight_key("*", "*"), moving_key("*", "*")):
            for key in self.redis.scan_iter(match=pattern, count=1000):
                held[key.decode()] = self.redis.llen(key)
        return held

    def inflight_jobs(self, bridge_id: str, queue: str) -> list[bytes]:
        return self.redis.lrange(inflight_key(bridge_id, queue), 0, -1)

    def inflight_count(self, bridge_id: str, queues: Iterable[str]) -> int:
        """Jobs the bridge holds: in-flight lists plus its moving lists."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(inflight_key(bridge_id, queue))
            for set_name in SCHEDULED_SETS:
                pipe.llen(moving_key(bridge_id, set_name))
            return sum(pipe.execute())

    def queue_sizes_and_oldest(self, queues: Sequence[str]) -> dict[str, tuple[int, bytes | None]]:
        """LLEN and the next-to-run job of each queue, in one round trip (for metrics)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue_key(queue))
                pipe.lindex(queue_key(queue), -1)
            replies = pipe.execute()
        return {q: (replies[2 * i], replies[2 * i + 1]) for i, q in enumerate(queues)}

    # -- gokiq-bridge: the scheduler (schedule and retry sets) -----------------------------

    def take_due(self, set_name: str, bridge_id: str, now: float, limit: int) -> list[bytes]:
        """Atomically take up to `limit` members due at `now` out of `set_name` into the bridge's
        moving list. Safe with many bridges: each member is taken by exactly one."""
        if set_name not in SCHEDULED_SETS:
            raise ValueError(f"not a scheduled set: {set_name!r}")
        keys = [set_name, moving_key(bridge_id, set_name)]
        return list(self.script("take_due")(keys=keys, args=[_score(now), limit]))

    def enqueue_moved(
        self, set_name: str, bridge_id: str, moves: Sequence[tuple[str, str | bytes, bytes]]
    ) -> None:
        """Push due jobs onto their queues and drop them from the moving list, in one MULTI.

        `moves` holds (queue, payload to push, the bytes taken out of the set)."""
        key = moving_key(bridge_id, set_name)
        with self.redis.pipeline(transaction=True) as pipe:
            for queue in dict.fromkeys(queue for queue, _, _ in moves):
                pipe.sadd(QUEUES, queue)
            for queue, payload, _ in moves:
                pipe.lpush(queue_key(queue), payload)
            for _, _, original in moves:
                pipe.lrem(key, 1, original)
            pipe.execute()

    def bury_moved(self, set_name: str, bridge_id: str, raw: bytes, entry: bytes = b"") -> None:
        """A set member that is not a job: dead set (as `entry`, default its exact bytes), out of
        the moving list."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._add_dead(pipe, entry or raw)
            pipe.lrem(moving_key(bridge_id, set_name), 1, raw)
            pipe.execute()

    # -- the delivery ledger (see DELIVERIES) ------------------------------------------------

    def record_deliveries(
        self, deliveries: Sequence[tuple[str, str, str]], deadline: float, pipe=None
    ) -> None:
        """Enter (token, queue, payload) triples, due to be presumed lost at `deadline`."""
        if not deliveries:
            return
        entries = {token: _delivery_entry(queue, payload) for token, queue, payload in deliveries}
        target = pipe if pipe is not None else self.redis.pipeline(transaction=True)
        target.hset(DELIVERIES, mapping=entries)
        target.zadd(DELIVERY_DEADLINES, dict.fromkeys(entries, _score(deadline)))
        if pipe is None:
            target.execute()

    def hand_over(
        self, bridge_id: str, queue: str, deliveries: Sequence[tuple[str, bytes]], deadline: float
    ) -> list[int]:
        """The bridge's jobs, as (token, exact bytes), leave its in-flight list for the ledger,
        in one script call. Returns the indexes of those it no longer held (another bridge gave
        them back to their queue): they were not entered and must not be published."""
        args: list[str | bytes] = [_score(deadline), queue]
        for token, raw in deliveries:
            args += [token, raw]
        keys = [DELIVERIES, DELIVERY_DEADLINES, inflight_key(bridge_id, queue)]
        return [int(i) - 1 for i in self.script("hand_over")(keys=keys, args=args)]

    def extend_deliveries(self, tokens: Sequence[str], deadline: float) -> None:
        """Push deadlines out to `deadline`, never in (a worker's claim may already be later)."""
        if tokens:
            self.redis.zadd(
                DELIVERY_DEADLINES, dict.fromkeys(tokens, _score(deadline)), xx=True, gt=True
            )

    def claim_delivery(self, token: str, deadline: float, holder: str) -> bool:
        """Worker process `holder` starts a delivery: False if the token is stale (settled or
        re-published)."""
        keys = [DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS, WORKERS]
        args = [token, _score(deadline), holder, _score(time.time())]
        return bool(self.script("claim_delivery")(keys=keys, args=args))

    def beat_worker(self, holder: str) -> None:
        """A sign of life of a worker process between claims (a long job, an idle worker)."""
        self.redis.zadd(WORKERS, {holder: _score(time.time())})

    def leave_workers(self, holder: str) -> None:
        """A clean exit: what the process held is settled, nothing to hand back."""
        self.redis.zrem(WORKERS, holder)

    def recover_dead_workers(
        self, delivery_timeout: float, now: float | None = None
    ) -> tuple[int, list[str]]:
        """Hand back the deliveries of worker processes silent for WORKER_TTL (see
        lua/recover_workers.lua): returns (deliveries handed back, dead processes)."""
        now = time.time() if now is None else now
        keys = [WORKERS, DELIVERY_DEADLINES, DELIVERY_HOLDERS]
        args = [_score(now), _score(WORKER_TTL), _score(delivery_timeout)]
        count, *dead = self.script("recover_workers")(keys=keys, args=args)
        return int(count), [holder.decode() for holder in dead]

    def settle_deliveries(
        self, tokens: Sequence[str], *, processed: int = 0, failed: int = 0, now=None
    ) -> None:
        """Deliveries are done (their jobs' fates are stored): their entries go, and the runs
        are counted in Sidekiq's stats (`stat:processed`, `stat:failed`, and the day's), in one
        transaction."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._forget_deliveries(pipe, tokens)
            self._count_runs(pipe, processed, failed, now)
            pipe.execute()

    def _forget_deliveries(self, pipe, tokens: Sequence[str]) -> None:
        if tokens:
            pipe.hdel(DELIVERIES, *tokens)
            pipe.zrem(DELIVERY_DEADLINES, *tokens)
            pipe.hdel(DELIVERY_HOLDERS, *tokens)

    def fail_into_retry_set(self, old: str | None, job: Job, at: float) -> None:
        """A short retry: the failed run's delivery is forgotten and counted in Sidekiq's
        stats, and the retry waits in `retry` until `at` (as `schedule_retry`), in one
        transaction. Its Celery countdown then claims it (`claim_retry`)."""
        with self.redis.pipeline(transaction=True) as pipe:
            self._forget_deliveries(pipe, [old] if old else [])
            pipe.zadd(RETRY, {job.text: _score(at)})
            self._count_runs(pipe, processed=1, failed=1)
            pipe.execute()

    def claim_retry(
        self, member: str, token: str, queue: str, deadline: float, holder: str
    ) -> bool:
        """A countdown retry fires: take its exact member out of `retry` and enter `token` in
        the ledger, held by `holder` (lua/claim_retry.lua). False: someone else took or removed
        the entry (the poller, Retry Now, Delete, Kill): the message is stale."""
        keys = [RETRY, DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS, WORKERS]
        args = [member, token, queue, _score(deadline), holder, _score(time.time())]
        return bool(self.script("claim_retry")(keys=keys, args=args))

    def take_overdue_deliveries(
        self, now: float, fresh_tokens: Sequence[str], deadline: float
    ) -> list[tuple[str, str, str]]:
        """Re-token up to len(fresh_tokens) overdue entries, atomically (safe with many
        bridges): returns (new token, queue, payload) to publish again."""
        keys = [DELIVERIES, DELIVERY_DEADLINES, DELIVERY_HOLDERS]
        args = [_score(now), _score(deadline), *fresh_tokens]
        flat = self.script("take_overdue_deliveries")(keys=keys, args=args)
        return [
            (token.decode(), *_parse_delivery_entry(entry))
            for token, entry in zip(flat[::2], flat[1::2], strict=True)
        ]

    def deliveries_pending(self) -> int:
        return self.redis.zcard(DELIVERY_DEADLINES)

    def delivery_tokens(self) -> list[str]:
        return sorted(token.decode() for token in self.redis.hkeys(DELIVERIES))

    def count_sidecar_death(self, jid: str) -> int:
        """The sidecar died while running `jid`: one more death on its count (kept
        SIDECAR_DEATHS_TTL after the last one). Returns the count."""
        key = sidecar_deaths_key(jid)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, SIDECAR_DEATHS_TTL)
            return int(pipe.execute()[0])

    # -- the sidecar's circuit breaker, as the workers share it --------------------------------

    def breaker_storage(self) -> pybreaker.CircuitRedisStorage:
        """pybreaker's shared state for the sidecar breaker (creates its keys if missing)."""
        return pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, self.redis, namespace=BREAKER_NAMESPACE
        )

    def breaker_open(
        self,
        storage: pybreaker.CircuitRedisStorage | None = None,
        reset_timeout: float | None = None,
    ) -> bool:
        """Whether the workers' sidecar breaker is open.

        With `reset_timeout`, an open breaker older than that counts as closed: pybreaker only
        moves to half-open when a worker makes a call, and a worker only calls when it gets a
        job, so a bridge that waited for "closed" forever would wait forever.
        """
        storage = storage or self.breaker_storage()
        if storage.state != pybreaker.STATE_OPEN:
            return False
        if reset_timeout is None:
            return True
        opened_at = storage.opened_at
        return opened_at is None or time.time() < opened_at.timestamp() + reset_timeout
