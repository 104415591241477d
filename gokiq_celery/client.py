"""Enqueue Sidekiq jobs from Python, exactly as `Sidekiq::Client.push` writes them.

For Python code that schedules the Rails app's jobs: Celery beat (the `gokiq.enqueue` task in
`gokiq_celery.enqueue`), a script, another service. A job pushed here is indistinguishable from
one the app pushed with a class *name* (`Sidekiq::Client.push("class" => "HardJob", ...)`):
Sidekiq's default options (`"retry": true`, `"queue": "default"`) overlaid with the caller's,
a 24-hex-digit jid, `created_at` and `enqueued_at` in the app's Sidekiq version's format (float
seconds for 6 and 7, integer milliseconds for 8), then SADD `queues` and LPUSH `queue:<q>` in
one pipeline; or, with `at`/`in_`, a ZADD on `schedule` without `enqueued_at`, as
`perform_at`/`perform_in` do. The class's own `sidekiq_options` live in Ruby, so give the ones
that matter (queue, retry, ...) here; the app's client middleware does not run (it would add
e.g. `cattr` for `Sidekiq::CurrentAttributes`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .settings import Settings, process_settings
from .sidekiq.job import dumps, timestamp
from .sidekiq.store import SidekiqStore
from .sidekiq.version import SidekiqVersionResolver

# Sidekiq.default_job_options: every push starts from these, in this order.
DEFAULT_OPTIONS: Mapping[str, Any] = {"retry": True, "queue": "default"}
# Fields the client writes itself (`at` is the `at=` argument; it is never in the payload).
RESERVED_KEYS = frozenset({"class", "args", "jid", "at", "created_at", "enqueued_at"})


class _RandomBytes:
    """The OS's random bytes, read 64 KiB (5,461 jids) at a time per thread. Each `os.urandom`
    releases the GIL, and taking it back can wait for another thread's switch interval: one
    read per jid made a bulk of 1,000 jobs queue for the GIL up to 1,000 times (py-spy on
    bench/ingest.py). A forked child starts with an empty buffer, so parent and child never
    hand out the same bytes."""

    SIZE = 65536

    def __init__(self) -> None:
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    def take(self, n: int) -> bytes:
        local = self._local
        buffer, used = getattr(local, "buffer", b""), getattr(local, "used", 0)
        if used + n > len(buffer):
            buffer, used = os.urandom(max(self.SIZE, n)), 0
            local.buffer = buffer
        local.used = used + n
        return buffer[used : used + n]


_random = _RandomBytes()


def new_jid() -> str:
    """Sidekiq's `SecureRandom.hex(12)`."""
    return _random.take(12).hex()


def new_jids(n: int) -> list[str]:
    """`n` jids (`new_jid`) from one read of the buffer: a bulk's jids cost a slice each."""
    text = _random.take(12 * n).hex()
    return [text[i : i + 24] for i in range(0, 24 * n, 24)]


class SidekiqClient:
    """Pushes jobs into one Sidekiq Redis, as the given Sidekiq version's client would."""

    def __init__(self, store: SidekiqStore, version: int | str | SidekiqVersionResolver) -> None:
        self.store = store
        self.versions = SidekiqVersionResolver.of(version)

    @classmethod
    def from_settings(cls, settings: Settings) -> SidekiqClient:
        """With `sidekiq_version: auto`, the version a sidecar published; a push before one is
        known raises SidekiqVersionUnknown rather than guess the timestamp format."""
        store = SidekiqStore.from_settings(settings)
        versions = store.versions(settings.sidekiq_version)
        return cls(store, versions)

    @property
    def version(self) -> int:
        """The app's Sidekiq major version, which decides the timestamp format written."""
        return self.versions.require().major

    def push(
        self,
        job_class: str,
        args: Sequence[Any] = (),
        *,
        at: float | None = None,
        in_: float | None = None,
        **options: Any,
    ) -> str:
        """Enqueue one job; return its jid. `options` are Sidekiq job options (`queue`,
        `retry`, `backtrace`, `dead`, `tags`, ...). `at` (epoch seconds) or `in_` (seconds from
        now) schedules it, as `perform_at` / `perform_in`; a time not in the future enqueues
        it now, as Sidekiq does."""
        return self.push_bulk(job_class, [args], at=at, in_=in_, **options)[0]

    def push_bulk(
        self,
        job_class: str,
        args_list: Iterable[Sequence[Any]],
        *,
        at: float | None = None,
        in_: float | None = None,
        **options: Any,
    ) -> list[str]:
        """Enqueue one job per argument list in one round trip (`Sidekiq::Client.push_bulk`):
        same options, own jids. Returns the jids in order."""
        now = time.time()
        when = schedule_time(at, in_, now)
        base = self.normalize(_item(job_class, options), now)
        jobs = [{**base, "args": json_args(args), "jid": new_jid()} for args in args_list]
        if not jobs:
            return []
        if when is not None:
            self.store.scheduled.schedule_payloads(
                [(self.encode(job, queued=False), when) for job in jobs]
            )
        else:
            enqueued_at = timestamp(self.version)
            payloads = [self.encode(job, enqueued_at=enqueued_at) for job in jobs]
            self.store.queues.push(base["queue"], *payloads)
        return [job["jid"] for job in jobs]

    def normalize(
        self, item: Mapping[str, Any], now: float, defaults: Mapping[str, Any] = DEFAULT_OPTIONS
    ) -> dict[str, Any]:
        """`normalize_item`: `defaults` (Sidekiq's; for a pushed class object, its own
        `get_sidekiq_options`), then the item's keys (class, args, options) in its order, as
        Ruby's Hash#merge orders them, so the JSON reads as Sidekiq's; then jid (a
        placeholder, set per job) and created_at."""
        fields: dict[str, Any] = dict(defaults)
        fields.update(item)
        fields["jid"] = ""
        if not isinstance(fields.get("queue"), str) or not fields["queue"]:
            raise ValueError("queue: must be a non-empty queue name")
        if "tags" in fields and not isinstance(fields["tags"], list):
            raise ValueError("tags: must be a list")
        fields["created_at"] = timestamp(self.version, now)
        return fields

    def encode(
        self, job: Mapping[str, Any], *, queued: bool = True, enqueued_at: Any = None
    ) -> str:
        """The payload's text (`written_fields`)."""
        return dumps(self.written_fields(job, queued=queued, enqueued_at=enqueued_at))

    def written_fields(
        self, job: Mapping[str, Any], *, queued: bool = True, enqueued_at: Any = None
    ) -> Mapping[str, Any]:
        """The payload's fields: a job put on a queue now gets `enqueued_at` (now, unless
        given), a scheduled one none, as Sidekiq's client writes them."""
        if not queued:
            return job
        return {**job, "enqueued_at": enqueued_at or timestamp(self.version)}


def _item(job_class: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The item `Sidekiq::Client.push` is given: class, args (set per job), then options."""
    if not isinstance(job_class, str) or not job_class:
        raise ValueError("job_class: the job's class name, e.g. 'HardJob'")
    reserved = RESERVED_KEYS.intersection(options)
    if reserved:
        raise ValueError(f"not a job option here: {', '.join(sorted(reserved))}")
    return {"class": job_class, "args": [], **options}


def json_args(args: Sequence[Any]) -> list[Any]:
    """The job's arguments, refused unless they survive JSON unchanged (Sidekiq 7's strict
    arguments): a tuple, a datetime or a set would reach Ruby as something else."""
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise ValueError("args: must be a list of the job's arguments")
    args = list(args)
    try:
        same = json.loads(dumps(args)) == args
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(
            "args: must be native JSON types (str, int, float, bool, None, list, dict)"
        )
    return args


def schedule_time(at: float | None, in_: float | None, now: float) -> float | None:
    """When to run, or None for now. `perform_in` takes an interval below 1e9 as relative."""
    if at is not None and in_ is not None:
        raise ValueError("give `at` or `in_`, not both")
    if in_ is not None:
        at = now + in_ if in_ < 1_000_000_000 else in_
    if at is None or at <= now:
        return None
    return float(at)


def push(
    job_class: str, args: Sequence[Any] = (), *, settings: Settings | None = None, **options: Any
) -> str:
    """Enqueue one job (see `SidekiqClient.push`) into the Redis of `settings`, by default
    this process's (REDIS_URL, GOKIQ_SIDEKIQ_VERSION, ...). For many pushes, keep a
    `SidekiqClient`: this builds one, and its Redis connection, per call."""
    client = SidekiqClient.from_settings(settings or process_settings())
    try:
        return client.push(job_class, args, **options)
    finally:
        client.store.redis.close()
