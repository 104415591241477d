"""SidekiqStore: one Sidekiq Redis, with each part of Sidekiq's data model on it.

Each part is a module of its own that owns its keys (named in keys.py) and Lua scripts
(lua/): queues.py (queues and the bridge's reliable fetch), scheduled.py (`schedule` and
`retry`), dead.py, stats.py, processes.py (the Busy page), bridges.py (the bridge registry),
ledger.py (the delivery ledger), sidecar_deaths.py and breaker.py. Every process builds one
store and hands it to what it runs, so tests give their own.
"""

from __future__ import annotations

import redis

from .breaker import SidecarBreaker
from .bridges import BridgeRegistry
from .dead import DeadSet
from .keys import SIDEKIQ_VERSION_KEY
from .ledger import DeliveryLedger
from .processes import ProcessRegistry
from .queues import Queues
from .redis_client import Scripts, connect
from .scheduled import ScheduledSets
from .sidecar_deaths import SidecarDeaths
from .stats import Stats
from .version import SidekiqVersionResolver


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
        scripts = Scripts(client)
        self.dead = DeadSet(client, dead_max_jobs, dead_timeout_in_seconds)
        self.queues = Queues(client, scripts, self.dead)
        self.scheduled = ScheduledSets(client, scripts, self.dead)
        self.stats = Stats(client)
        self.processes = ProcessRegistry(client)
        self.bridges = BridgeRegistry(client, scripts)
        self.ledger = DeliveryLedger(client, scripts, self.scheduled)
        self.sidecar_deaths = SidecarDeaths(client)
        self.breaker = SidecarBreaker(client)

    @classmethod
    def from_settings(cls, settings) -> SidekiqStore:  # settings: gokiq_celery.settings.Settings
        """The one way every process (bridge, worker, Flower) connects to Sidekiq's Redis."""
        return cls(
            connect(settings.redis_url),
            dead_max_jobs=settings.dead_max_jobs,
            dead_timeout_in_seconds=settings.dead_timeout_in_seconds,
        )

    def published_sidekiq_version(self) -> str | None:
        """`Sidekiq::VERSION` as the app's sidecar last published it, if one has."""
        value = self.redis.get(SIDEKIQ_VERSION_KEY)
        return value.decode() if value is not None else None

    def versions(self, setting: str | int) -> SidekiqVersionResolver:
        """The app's Sidekiq version for one process: `setting` (the `sidekiq_version`
        setting) when it names one, else what the app's sidecars published here."""
        return SidekiqVersionResolver(setting, self.published_sidekiq_version)
