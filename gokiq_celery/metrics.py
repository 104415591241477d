"""Prometheus metrics of the Celery worker, served on `worker_metrics_port` (`/metrics`, and
`/health`: the worker process is alive).

Counters live in the worker process, which is the only process with the default threads
pool; with a prefork pool each child counts apart, so use Flower's metrics there.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .http import StatusServer
from .settings import Settings
from .sidekiq.job import Job

log = logging.getLogger(__name__)

OTHER = "(other)"
# Statuses the sidecar gives only after it resolved the job's class (README: HTTP contract).
RESOLVED_STATUSES = frozenset({"ok", "failed", "duplicate"})


class ClassLabels:
    """The `class` label values: class names the sidecar resolved, so a payload cannot mint
    labels (its `display_class`, or a made-up class, would grow every scrape without bound);
    anything else, and any class past `limit`, is counted as "(other)"."""

    def __init__(self, limit: int = 500) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def learn(self, job: Job) -> None:
        name = class_name(job)
        if name not in self._known:
            with self._lock:
                if len(self._known) < self.limit:
                    self._known.add(name)

    def label(self, job: Job) -> str:
        name = class_name(job)
        return name if name in self._known else OTHER


# Seconds from taking a job to its outcome (the sidecar's Metrics::BUCKETS are the same).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BREAKER_VALUES = {"closed": 0, "half-open": 1, "open": 2}


class WorkerMetrics:
    """All of a worker process's metrics, in one registry: the process's default one (with
    the process collectors) for the worker Celery runs, a registry of its own otherwise (tests,
    tools), as the bridge's BridgeMetrics."""

    def __init__(self, registry: CollectorRegistry | None = None, class_limit: int = 500) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "gokiq_worker_jobs",
            "Jobs the worker handled, by outcome",
            ["queue", "class", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "gokiq_worker_job_duration_seconds",
            "Time from taking a job to its outcome, sidecar call included",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "gokiq_worker_breaker_state",
            "Sidecar circuit breaker: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        self.class_labels = ClassLabels(class_limit)

    def observe_breaker(self, state: str) -> None:
        self.breaker_state.set(_BREAKER_VALUES.get(state, 0))


@functools.cache
def process_metrics() -> WorkerMetrics:
    """The worker process's metrics, on the default registry: made once, on the first call
    (a prefork pool's children inherit the parent's, and count apart)."""
    return WorkerMetrics(REGISTRY)


def class_name(job: Job) -> str:
    """The class the sidecar runs: ActiveJob's `wrapped` (it checks it), else `class`."""
    wrapped = job.get("wrapped")
    return wrapped if job.is_active_job and isinstance(wrapped, str) else job.class_name


def queue_label(queue: str, configured: Iterable[str]) -> str:
    """A queue label: the configured queues only (a payload's retry_queue may be any string)."""
    return queue if queue in configured else OTHER


def serve_worker_metrics(settings: Settings, registry: CollectorRegistry) -> StatusServer | None:
    """Serve `registry` (the worker's metrics) on /metrics, and /health, unless the port is 0
    or taken."""
    if not settings.worker_metrics_port:
        return None
    try:
        server = StatusServer(
            settings.worker_metrics_bind, settings.worker_metrics_port, registry, name="worker-http"
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
