"""Sidekiq's retry semantics (docs/sidekiq-protocol.md §3), decided in one place.

Given a failed job, `RetryPolicy.decide` writes the error fields Sidekiq would write and says
what happens next: retry after a delay, go to the dead set, or be dropped. Who carries the
decision out (Celery's retry, the `retry` set, the dead set) is the task's business.
"""

from __future__ import annotations

import base64
import json
import random
import time
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .job import Job, epoch_seconds, finite_number, timestamp
from .version import SidekiqVersion, SidekiqVersionResolver

MAX_ERROR_MESSAGE = 10_000  # as the sidecar cuts it (Runner::MAX_MESSAGE)
# A delay past this (a retry_count or `sidekiq_retry_in` in the millions) is this: later than any
# deploy will live, and still a finite float for Redis scores and Celery countdowns.
MAX_DELAY = 100 * 365 * 86400.0


@dataclass(frozen=True)
class Failure:
    """How one run of a job failed, as the sidecar reported it."""

    error_class: str
    error_message: str
    backtrace: tuple[str, ...] = ()
    retry_in: int | float | str | None = None  # from `sidekiq_retry_in`: seconds, discard, kill
    class_retry: Any = None  # the class's `retry` option, used when the payload has none


class Outcome(StrEnum):
    """What one run of a job came to: the one vocabulary of the policy's decisions, the
    worker's results, the `outcome` of its log lines and metrics, and the job history's runs."""

    # Sidekiq's decision on a failure (`RetryPolicy.decide`)
    RETRY = "retry"  # run again after `delay` (a Celery countdown)
    DEAD = "dead"  # exhausted: hook, dead set (unless `dead: false`), death handlers
    DROPPED = "dropped"  # `retry: false`: not retried, not dead; death handlers only
    DISCARDED = "discarded"  # `sidekiq_retry_in` said :discard: gone, no hook, no dead set
    # What else a delivery can come to (gokiq_celery/worker.py)
    OK = "ok"
    PARKED = "parked"  # a retry left in the `retry` set for the bridge's poller
    UNAVAILABLE = "unavailable"  # the sidecar could not run it: back on its queue
    DUPLICATE = "duplicate"  # another run of the jid holds it in the sidecar (409)
    INVALID = "invalid"  # not a job: dead set
    STALE = "stale"  # its delivery was settled or published again: not run


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    job: Job  # the payload with Sidekiq's error fields, ready to store
    delay: float = 0.0
    limit: int = 0  # the job's retry limit (Celery's max_retries)
    # Whether the app's death handlers run for a DROPPED or DISCARDED job (a DEAD one runs them
    # after its exhausted hook, as that hook's answer says).
    death_handlers: bool = False

    @property
    def goes_to_dead_set(self) -> bool:
        return self.outcome is Outcome.DEAD and self.job.get("dead") is not False


class RetryPolicy:
    """Maps a job's `retry` field and a failure onto Sidekiq's next step, as the app's Sidekiq
    version does it (`decide` raises SidekiqVersionUnknown while that is not known)."""

    def __init__(
        self,
        max_retries: int = 25,
        sidekiq_version: int | str | SidekiqVersionResolver = 7,
        rng: random.Random | None = None,
    ):
        self.max_retries = max_retries
        self.versions = SidekiqVersionResolver.of(sidekiq_version)
        self.rng = rng or random.Random()

    def limit(self, retry: Any) -> int:
        """`retry: n` (an Integer in Ruby's sense) is n; any other truthy value is the default."""
        if isinstance(retry, int) and not isinstance(retry, bool):
            return retry
        return self.max_retries

    def decide(self, job: Job, failure: Failure, queue: str, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        retry = job.retry if "retry" in job else failure.class_retry
        if retry is False or retry is None:
            return Decision(Outcome.DROPPED, job, death_handlers=True)
        version = self.versions.require()
        major = version.major
        failed = job.replace(self._error_fields(job, failure, queue, now, major))
        limit = self.limit(retry)
        count = failed.get("retry_count")
        if failure.retry_in == "discard":
            # 8.0.7+ run the death handlers for it; earlier versions drop it silently.
            handlers = _since(version, 8, 0, 7)
            discarded = self._discarded(failed, now, version)
            return Decision(Outcome.DISCARDED, discarded, limit=limit, death_handlers=handlers)
        if failure.retry_in == "kill" or self._exhausted(failed, count, limit, now, version):
            return Decision(Outcome.DEAD, failed, limit=limit)
        return Decision(Outcome.RETRY, failed, self._delay(count, failure.retry_in, major), limit)

    def unburied(self, job: Job, now: float | None = None) -> Job:
        """An exhausted job that skips the dead set (`dead: false`, or its exhausted hook's
        :discard), as the death handlers then get it: 8.0.8+ stamp `discarded_at` on it."""
        now = time.time() if now is None else now
        return self._discarded(job, now, self.versions.require())

    def delay(self, count: int, custom: Any = None) -> float:
        """`count⁴ + 15` or the custom delay, plus Sidekiq's jitter for this version."""
        return self._delay(count, custom, self.versions.require().major)

    def _delay(self, count: int, custom: Any, major: int) -> float:
        base = count**4 + 15
        if _finite(custom) and custom > 0:
            base = int(custom)
        if major >= 8:
            return min(base + self.rng.randrange(10 * (count + 1)), MAX_DELAY)
        return min(base + self.rng.randrange(10) * (count + 1), MAX_DELAY)

    def _error_fields(
        self, job: Job, failure: Failure, queue: str, now: float, major: int
    ) -> dict[str, Any]:
        stamp = timestamp(major, now)
        fields: dict[str, Any] = {
            "queue": job.get("retry_queue") or queue,
            "error_message": _scrub(failure.error_message)[:MAX_ERROR_MESSAGE],
            "error_class": failure.error_class,
        }
        # Job.parse let through only an integer ≥ -1 or null (which Sidekiq reads as none).
        if job.get("retry_count") is not None:
            fields["retry_count"] = job.get("retry_count") + 1
            fields["retried_at"] = stamp
        else:
            fields["retry_count"] = 0
            fields["failed_at"] = stamp
        lines = _backtrace_lines(job.get("backtrace"), failure.backtrace)
        if lines is not None:
            fields["error_backtrace"] = encode_backtrace(lines)
        return fields

    def _exhausted(
        self, job: Job, count: int, limit: int, now: float, version: SidekiqVersion
    ) -> bool:
        retry_for = job.get("retry_for")
        if _finite(retry_for):
            started = epoch_seconds(job.get("failed_at")) or now
            out_of_time = started + retry_for < now
            if _since(version, 8, 1):  # 8.1: the window replaces the count
                return out_of_time
            if out_of_time:
                return True
        return count >= limit

    def _discarded(self, job: Job, now: float, version: SidekiqVersion) -> Job:
        if _since(version, 8, 0, 8):
            return job.replace({"discarded_at": int(now * 1000)})
        return job


def _since(version: SidekiqVersion, *release: int) -> bool:
    """Is the app's Sidekiq `release` or newer? A bare major (`sidekiq_version: 8`) is taken as
    that major's newest release."""
    return version.before(*release) is not True


def encode_backtrace(lines: list[str]) -> str:
    """Sidekiq's `error_backtrace`: strict base64 of zlib of a JSON array (all readers take it)."""
    return base64.b64encode(zlib.compress(json.dumps(lines).encode())).decode()


def decode_backtrace(value: str) -> list[str]:
    """Read either base64 form (strict, or MIME with newlines from Sidekiq ≤ 7.2.0)."""
    return json.loads(zlib.decompress(base64.b64decode(value)))


def _backtrace_lines(option: Any, lines: tuple[str, ...]) -> list[str] | None:
    if option is None or option is False:
        return None
    if isinstance(option, int) and not isinstance(option, bool):
        return list(lines[:option])
    return list(lines)


def _finite(value: Any) -> bool:
    """A JSON number usable as seconds (with a time added to it, still a float)."""
    return finite_number(value) and abs(value) <= MAX_DELAY * 1000


def _scrub(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")
