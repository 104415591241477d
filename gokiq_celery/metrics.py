"""Prometheus metrics of the Celery worker, served on `worker_metrics_port` (`/metrics`, and
`/health`: the worker process is alive).

Counters live in the worker process, which is the only process with the default threads
pool; with a prefork pool each child counts apart, so use Flower's metrics there.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from .http import StatusServer
from .settings import Settings, process_settings

log = logging.getLogger(__name__)

JOBS = Counter(
    "gokiq_worker_jobs", "Jobs the worker handled, by outcome", ["queue", "class", "outcome"]
)
DURATION = Histogram(
    "gokiq_worker_job_duration_seconds",
    "Time from taking a job to its outcome, sidecar call included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
BREAKER_STATE = Gauge(
    "gokiq_worker_breaker_state", "Sidecar circuit breaker: 0 closed, 1 half-open, 2 open"
)
_BREAKER_VALUES = {"closed": 0, "half-open": 1, "open": 2}


def observe_breaker(state: str) -> None:
    BREAKER_STATE.set(_BREAKER_VALUES.get(state, 0))


def serve_worker_metrics(settings: Settings | None = None) -> StatusServer | None:
    """Start the worker's /metrics and /health, unless its port is 0 or taken."""
    settings = settings or process_settings()
    if not settings.worker_metrics_port:
        return None
    try:
        server = StatusServer(
            settings.worker_metrics_bind, settings.worker_metrics_port, REGISTRY, name="worker-http"
        )
    except OSError as exc:  # a second worker on the same host: Flower still has the numbers
        log.warning("worker /metrics not served on port %s: %s", settings.worker_metrics_port, exc)
        return None
    server.start()
    log.info(
        "worker metrics on http://%s:%s/metrics",
        settings.worker_metrics_bind,
        settings.worker_metrics_port,
    )
    return server
