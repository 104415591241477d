"""Noticing that the broker's Redis restarted, and handing its lost fetches back to the ledger.

kombu's fetch (BRPOP) is not atomic with its reply: a Redis that ran the pop (and wrote it to
its AOF) and then exited before replying leaves a message no worker ever received, in no queue
and in no `unacked` record. The delivery ledger still has its job, but would publish it again
only at its deadline (`delivery_timeout`, five minutes). So the bridge's housekeeping asks the
broker for its `run_id` (INFO server; a new one at every start of a redis-server) and, when it
changed, has the ledger make every unclaimed delivery published before the restart due now
(`DeliveryLedger.broker_restarted`); the overdue path publishes them again within a second.

RabbitMQ has no such gap (a delivery is the broker's until acked) and is not watched.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import redis

from gokiq_celery.sidekiq.ledger import DeliveryLedger
from gokiq_celery.sidekiq.redis_client import connect

log = logging.getLogger("gokiq.bridge")

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
# A delivery published up to this long after the restart the broker reports (whole seconds of
# uptime, clocks of other hosts) still counts as before it: one more re-publish at worst.
RESTART_MARGIN = 2.0


class BrokerRestarts:
    """Watches a Redis broker's run_id; `check()` hands back what a restart may have lost."""

    def __init__(
        self, broker: redis.Redis | None, ledger: DeliveryLedger, delivery_timeout: float
    ) -> None:
        self.broker = broker  # None: not a Redis broker, nothing to watch
        self.ledger = ledger
        self.delivery_timeout = delivery_timeout
        self.run_id: str | None = None  # what this bridge last saw and the ledger recorded

    @classmethod
    def for_broker(
        cls, broker_url: str, ledger: DeliveryLedger, delivery_timeout: float
    ) -> BrokerRestarts:
        # No reconnection retries: a broker that is down fails the check at once (tried again
        # at the next one) instead of stalling the bridge's heartbeat behind it.
        is_redis = urlsplit(broker_url).scheme in REDIS_SCHEMES
        broker = connect(broker_url, reconnect=False) if is_redis else None
        return cls(broker, ledger, delivery_timeout)

    def check(self) -> int | None:
        """Compare the broker's run_id with the last one seen; on a restart, make the
        deliveries it may have lost due now. Returns how many were, or None (no restart)."""
        if self.broker is None:
            return None
        try:
            info = self.broker.info("server")
            run_id = info["run_id"]
        except (redis.ResponseError, KeyError) as exc:  # INFO renamed away, or no run_id in it
            log.warning(
                "cannot read the broker's run_id (%s): after a restart of its Redis, a fetch "
                "it cut waits for delivery_timeout",
                exc,
            )
            self.close()
            self.broker = None
            return None
        if run_id == self.run_id:
            return None
        restarted_at = time.time() - float(info["uptime_in_seconds"]) + RESTART_MARGIN
        made_due = self.ledger.broker_restarted(run_id, restarted_at, self.delivery_timeout)
        self.run_id = run_id
        if made_due is not None:
            log.warning(
                "the broker's Redis restarted (new run_id): %d unclaimed deliveries published "
                "before it are published again now (its last fetches may have reached no worker)",
                made_due,
                extra={"returned": made_due, "broker_uptime_s": info["uptime_in_seconds"]},
            )
        return made_due

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()
