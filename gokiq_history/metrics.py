"""The recorder's Prometheus counters, in the registry of the process's /metrics.

The worker serves the default registry; the bridge its own (`BridgeMetrics.registry`). One set
of counters per registry, made on first use, so that building a second recorder in a process
(tests, a restarted bridge object) does not register a name twice.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter


@dataclass(frozen=True)
class HistoryMetrics:
    written: Counter
    dropped: Counter
    write_errors: Counter
    deleted: Counter


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, HistoryMetrics] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def history_metrics(registry: CollectorRegistry | None = None) -> HistoryMetrics:
    registry = registry or REGISTRY
    with _lock:
        if registry not in _by_registry:
            _by_registry[registry] = _new(registry)
        return _by_registry[registry]


def _new(registry: CollectorRegistry) -> HistoryMetrics:
    def counter(name: str, text: str) -> Counter:
        return Counter(name, text, registry=registry)

    return HistoryMetrics(
        written=counter("gokiq_history_written", "History rows written (merged upserts)"),
        dropped=counter(
            "gokiq_history_dropped",
            "History events dropped because the buffer was full (database slow or down)",
        ),
        write_errors=counter("gokiq_history_write_errors", "History batches that failed"),
        deleted=counter("gokiq_history_deleted", "Jobs deleted from the history by retention"),
    )
