"""SidecarClient: runs a job in the Rails sidecar over HTTP, behind a circuit breaker.

The contract is rails_sidecar/README.md. Only "the sidecar is unavailable" (connection
refused or reset, connect timeout, 502/503/504, 401) trips the breaker and raises
`SidecarUnavailable`; a job that raised is a normal answer, not an error of the sidecar.
The breaker's state lives in Redis so every worker and the bridge see the same circuit.

HTTP is one keep-alive connection per thread (gokiq_celery.connection), not requests or
urllib3: requests' own per-call work alone cost more than everything else a worker does for a
job, and urllib3 makes twice the syscalls (GIL hand-offs between the pool's threads).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import pybreaker
import redis

from .connection import ConnectFailed, Reply, SidecarConnection, valid_header_value
from .metrics import WorkerMetrics
from .settings import Settings
from .sidekiq.breaker import SharedBreakerStorage
from .sidekiq.job import Job, dumps, finite_number
from .sidekiq.retry import Failure

log = logging.getLogger(__name__)

UNAVAILABLE_STATUSES = frozenset({401, 502, 503, 504})


class SidecarUnavailable(Exception):
    """The sidecar could not run the job; not the job's fault, so no retry is spent."""


class SidecarDied(SidecarUnavailable):
    """The connection broke after the job was sent: the sidecar may have died running it."""


class SidecarTimeout(Exception):
    """The sidecar took the job but did not answer within `job_timeout`: the job's failure."""


@dataclass(frozen=True)
class Execution:
    """What one `POST /jobs/execute` said."""

    status: str  # ok | failed | invalid_class | bad_request | too_large | duplicate
    execution_time: float = 0.0
    failure: Failure | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "ok"


class SidecarClient:
    def __init__(
        self,
        settings: Settings,
        breaker_redis: redis.Redis,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()  # the breaker's state gauge
        self.base_url = settings.sidecar_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if settings.sidecar_token:
            self._headers["Authorization"] = f"Bearer {settings.sidecar_token}"
        self._breaker_redis = breaker_redis
        # Per thread (or greenlet): a breaker object serialises its calls behind a lock, and a
        # connection serves one call at a time. The breakers share their state through Redis.
        self._local = threading.local()

    def execute(self, job: Job, queue: str) -> Execution:
        try:
            # Optional header: a queue name it cannot carry is left to the payload's `queue`.
            headers = {"X-Gokiq-Queue": queue} if valid_header_value(queue) else {}
            response = self._post("/jobs/execute", job.raw, headers)
        except SidecarTimeout as exc:
            return Execution(
                "failed", self.settings.job_timeout, Failure("Gokiq::JobTimeout", str(exc))
            )
        return parse_execution(response)

    def exhausted(
        self,
        job: Job,
        failure: Failure,
        *,
        run_hook: bool,
        death_handlers: bool,
        discarded: bool = False,
    ) -> bool:
        """Run the job's `sidekiq_retries_exhausted` hook and/or the app's death handlers.

        Returns True when the hook asked for the job to be discarded (no dead set entry) and the
        app's Sidekiq honours that. `discarded` passes that answer on to the death handlers'
        call: the sidecar knows whether the app's Sidekiq version runs them after a discard.
        """
        others = {
            "error_class": failure.error_class,
            "error_message": failure.error_message,
            "run_hook": run_hook,
            "death_handlers": death_handlers,
            "discarded": discarded,
        }
        # The job's own text, not its decoded fields: a "\ud800" escape in its args stays an
        # escape (decoded, it is a lone surrogate that UTF-8 cannot carry).
        body = b'{"job":' + job.raw + b"," + _dumps(others)[1:]
        try:
            response = self._post("/jobs/exhausted", body, {})
        except SidecarTimeout:
            log.warning("sidecar did not answer /jobs/exhausted in time", extra=job.log_context())
            return False
        return bool(_json(response.body).get("discard"))

    @property
    def breaker(self) -> pybreaker.CircuitBreaker:
        if not hasattr(self._local, "breaker"):
            self._local.breaker = pybreaker.CircuitBreaker(
                fail_max=self.settings.breaker_fail_max,
                reset_timeout=self.settings.breaker_reset_timeout,
                state_storage=SharedBreakerStorage(self._breaker_redis),
                exclude=[SidecarTimeout],
                listeners=[_BreakerMetrics(self.metrics)],
                name="sidecar",
            )
            self.metrics.observe_breaker(self._local.breaker.current_state)
        return self._local.breaker

    @property
    def connection(self) -> SidecarConnection:
        if not hasattr(self._local, "connection"):
            self._local.connection = SidecarConnection(
                self.base_url, self.settings.sidecar_connect_timeout, self.settings.job_timeout
            )
        return self._local.connection

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        try:
            return self.breaker.call(self._send, path, body, headers)
        except pybreaker.CircuitBreakerError as exc:
            raise SidecarUnavailable(f"circuit open: {exc}") from exc

    def _send(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        try:
            reply = self.connection.post(path, body, {**self._headers, **headers})
        except ConnectFailed as exc:
            raise SidecarUnavailable(f"{self.base_url}{path}: cannot connect ({exc})") from exc
        except TimeoutError as exc:
            raise SidecarTimeout(f"no answer within {self.settings.job_timeout}s") from exc
        except (OSError, http.client.HTTPException) as exc:  # reset, closed, broken response
            raise SidecarDied(f"{self.base_url}{path}: {exc.__class__.__name__}") from exc
        if reply.status in UNAVAILABLE_STATUSES:
            if reply.status == 401:
                log.error("sidecar refused gokiq's token (401): check GOKIQ_SIDECAR_TOKEN")
            raise SidecarUnavailable(f"{self.base_url}{path}: HTTP {reply.status}")
        return reply


class _BreakerMetrics(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def state_change(self, cb, old_state, new_state) -> None:
        self.metrics.observe_breaker(new_state.name)
        log.warning(
            "sidecar circuit breaker %s -> %s", old_state and old_state.name, new_state.name
        )


def parse_execution(response: Reply) -> Execution:
    """What a `/jobs/execute` answer says, whatever its body holds (never raises)."""
    body = _json(response.body)
    elapsed = _seconds(body.get("execution_time"))
    if response.status == 200:
        return Execution("ok", elapsed)
    if response.status == 409:
        return Execution("duplicate")
    status = body.get("status")
    return Execution(
        status if isinstance(status, str) and status else "failed",
        elapsed,
        _failure(response, body),
    )


# Answers that say the payload itself can never run (Ruby's JSON refused it, or it is too
# large): retrying would fail the same way, so the job is killed (dead set) at once.
UNRUNNABLE_STATUSES = frozenset({400, 413})


def _failure(response: Reply, body: dict[str, Any]) -> Failure:
    retry_in = body.get("retry_in")
    if response.status in UNRUNNABLE_STATUSES:
        retry_in = "kill"
    elif retry_in not in ("discard", "kill") and not (finite_number(retry_in) and retry_in > 0):
        retry_in = None
    backtrace = body.get("backtrace")
    return Failure(
        error_class=_text(body.get("error_class")) or f"Gokiq::SidecarHTTP{response.status}",
        error_message=_text(body.get("error_message")) or _text(response.reason),
        backtrace=tuple(map(_text, backtrace)) if isinstance(backtrace, list) else (),
        retry_in=retry_in,
        class_retry=body.get("class_retry"),
    )


def _seconds(value: Any) -> float:
    return float(value) if finite_number(value) and 0 <= value < 1e9 else 0.0


def _text(value: Any) -> str:
    """A reply's string as UTF-8 can carry it (a "\ud800" escape decodes to a lone surrogate)."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text.encode("utf-8", "replace").decode("utf-8")


def _json(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _dumps(value: Any) -> bytes:
    return dumps(value).encode("utf-8")
