"""SidecarClient: runs a job in the Rails sidecar over HTTP, behind a circuit breaker.

The contract is rails_sidecar/README.md. Only "the sidecar is unavailable" (connection
refused or reset, connect timeout, 502/503/504, 401) trips the breaker and raises
`SidecarUnavailable`; a job that raised is a normal answer, not an error of the sidecar.
The breaker's state lives in Redis so every worker and the bridge see the same circuit.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import pybreaker
import redis
import requests
from requests.adapters import HTTPAdapter

from . import metrics
from .settings import Settings
from .sidekiq.job import Job, dumps
from .sidekiq.retry import Failure
from .sidekiq.store import BREAKER_NAMESPACE

log = logging.getLogger(__name__)

UNAVAILABLE_STATUSES = frozenset({401, 502, 503, 504})


class SidecarUnavailable(Exception):
    """The sidecar could not run the job; not the job's fault, so no retry is spent."""


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
    def __init__(self, settings: Settings, breaker_redis: redis.Redis) -> None:
        self.settings = settings
        self.base_url = settings.sidecar_url.rstrip("/")
        self._breaker_redis = breaker_redis
        # One breaker object serialises its calls behind a lock, so each thread gets its own;
        # they share state through Redis. Sessions are per thread for the same reason.
        self._local = threading.local()

    def execute(self, job: Job, queue: str) -> Execution:
        try:
            response = self._post("/jobs/execute", job.raw, {"X-Gokiq-Queue": queue})
        except SidecarTimeout as exc:
            return Execution(
                "failed", self.settings.job_timeout, Failure("Gokiq::JobTimeout", str(exc))
            )
        body = _json(response)
        if response.status_code == 200:
            return Execution("ok", float(body.get("execution_time") or 0.0))
        if response.status_code == 409:
            return Execution("duplicate")
        return Execution(
            body.get("status") or "failed",
            float(body.get("execution_time") or 0.0),
            _failure(response, body),
        )

    def exhausted(
        self, job: Job, failure: Failure, *, run_hook: bool, death_handlers: bool
    ) -> bool:
        """Run the job's `sidekiq_retries_exhausted` hook and/or the app's death handlers.

        Returns True when the hook asked for the job to be discarded (no dead set entry).
        """
        payload = {
            "job": job.fields,
            "error_class": failure.error_class,
            "error_message": failure.error_message,
            "run_hook": run_hook,
            "death_handlers": death_handlers,
        }
        try:
            body = _json(self._post("/jobs/exhausted", _dumps(payload), {}))
        except SidecarTimeout:
            log.warning("sidecar did not answer /jobs/exhausted in time", extra=job.log_context())
            return False
        return bool(body.get("discard"))

    @property
    def breaker(self) -> pybreaker.CircuitBreaker:
        if not hasattr(self._local, "breaker"):
            storage = pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, self._breaker_redis, namespace=BREAKER_NAMESPACE
            )
            self._local.breaker = pybreaker.CircuitBreaker(
                fail_max=self.settings.breaker_fail_max,
                reset_timeout=self.settings.breaker_reset_timeout,
                state_storage=storage,
                exclude=[SidecarTimeout],
                listeners=[_BreakerMetrics()],
                name="sidecar",
            )
            metrics.observe_breaker(self._local.breaker.current_state)
        return self._local.breaker

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.trust_env = False  # no proxy/netrc lookups per call: the sidecar is local
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["Content-Type"] = "application/json"
            if self.settings.sidecar_token:
                session.headers["Authorization"] = f"Bearer {self.settings.sidecar_token}"
            self._local.session = session
        return self._local.session

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        try:
            return self.breaker.call(self._send, path, body, headers)
        except pybreaker.CircuitBreakerError as exc:
            raise SidecarUnavailable(f"circuit open: {exc}") from exc

    def _send(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        timeout = (self.settings.sidecar_connect_timeout, self.settings.job_timeout)
        try:
            response = self.session.post(
                self.base_url + path, data=body, headers=headers, timeout=timeout
            )
        except requests.ReadTimeout as exc:
            raise SidecarTimeout(f"no answer within {self.settings.job_timeout}s") from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise SidecarUnavailable(f"{self.base_url}{path}: {exc.__class__.__name__}") from exc
        if response.status_code in UNAVAILABLE_STATUSES:
            if response.status_code == 401:
                log.error("sidecar refused gokiq's token (401): check GOKIQ_SIDECAR_TOKEN")
            raise SidecarUnavailable(f"{self.base_url}{path}: HTTP {response.status_code}")
        return response


class _BreakerMetrics(pybreaker.CircuitBreakerListener):
    def state_change(self, cb, old_state, new_state) -> None:
        metrics.observe_breaker(new_state.name)
        log.warning(
            "sidecar circuit breaker %s -> %s", old_state and old_state.name, new_state.name
        )


def _failure(response: requests.Response, body: dict[str, Any]) -> Failure:
    retry_in = body.get("retry_in")
    return Failure(
        error_class=str(body.get("error_class") or f"Gokiq::SidecarHTTP{response.status_code}"),
        error_message=str(body.get("error_message") or response.reason or ""),
        backtrace=tuple(str(line) for line in body.get("backtrace") or ()),
        retry_in=retry_in if isinstance(retry_in, int | float | str) else None,
        class_retry=body.get("class_retry"),
    )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _dumps(value: Any) -> bytes:
    return dumps(value).encode("utf-8")
