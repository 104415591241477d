"""The bridge's Prometheus metrics. The names are what the dashboards query: keep them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BridgeMetrics:
    """All of one bridge's metrics, in their own registry (several bridges can share a test
    process without clashing)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs_moved = Counter(
            "gokiq_bridge_jobs_moved",
            "Jobs published to Celery, by Sidekiq queue",
            ["queue"],
            registry=r,
        )
        self.queue_size = Gauge(
            "gokiq_bridge_queue_size", "Jobs waiting in the Sidekiq queue", ["queue"], registry=r
        )
        self.queue_latency = Gauge(
            "gokiq_bridge_queue_latency_seconds",
            "Now minus enqueued_at of the oldest job in the Sidekiq queue (0 if empty)",
            ["queue"],
            registry=r,
        )
        self.inflight = Gauge(
            "gokiq_bridge_inflight", "Jobs this bridge holds in its in-flight lists", registry=r
        )
        self.scheduler_moved = Counter(
            "gokiq_bridge_scheduler_moved",
            "Due jobs moved from schedule/retry onto their queue",
            ["set"],
            registry=r,
        )
        self.poison = Counter(
            "gokiq_bridge_poison",
            "Payloads that are not jobs, sent to the dead set",
            ["queue", "reason"],
            registry=r,
        )
        self.paused = Gauge(
            "gokiq_bridge_paused",
            "1 while the bridge holds jobs back (pending: Celery queue full; breaker: sidecar "
            "circuit breaker open)",
            ["reason"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "gokiq_bridge_breaker_open", "1 while the sidecar circuit breaker is open", registry=r
        )
        self.set_size = Gauge(
            "gokiq_bridge_set_size", "Size of Sidekiq's sorted sets", ["set"], registry=r
        )
        self.republished = Counter(
            "gokiq_bridge_republished",
            "Jobs published again because no worker settled their message in time",
            ["queue"],
            registry=r,
        )
        self.deliveries = Gauge(
            "gokiq_bridge_deliveries",
            "Jobs handed to Celery and not yet settled by a worker (the delivery ledger)",
            registry=r,
        )
        for reason in ("pending", "breaker"):
            self.paused.labels(reason).set(0)
