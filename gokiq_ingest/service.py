"""What the ingestion routes share in one gokiq-api process: the clients, the app's classes,
Sidekiq's Redis (its client, the submission writer that also applies the rate limits), the
audit and the history recorder."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from gokiq_celery.api_clients import ApiClients
from gokiq_celery.client import SidekiqClient
from gokiq_celery.settings import Settings
from gokiq_celery.sidekiq.redis_client import connect_fail_fast, connect_fail_fast_async
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_celery.sidekiq.submissions import Submissions
from gokiq_history.recorder import Recorder, open_recorder

from .audit import Auditor
from .catalog import JobCatalog, sidecar_fetcher
from .jobs import Prepared


@dataclass
class Ingest:
    clients: ApiClients
    catalog: JobCatalog
    sidekiq: SidekiqClient
    submissions: Submissions
    auditor: Auditor
    recorder: Recorder
    idempotency_ttl: float

    @classmethod
    def from_settings(cls, settings: Settings, clients: ApiClients) -> Ingest:
        client = connect_fail_fast(settings.redis_url)
        store = SidekiqStore(client)
        versions = store.versions(settings.sidekiq_version)
        engine = None
        if settings.history_url:
            from gokiq_history.store import open_engine

            engine = open_engine(settings.history_url)
        return cls(
            clients=clients,
            catalog=JobCatalog(
                sidecar_fetcher(settings.sidecar_url, settings.sidecar_token),
                settings.api_classes_refresh,
            ),
            sidekiq=SidekiqClient(store, versions),
            submissions=Submissions(client, connect_fail_fast_async(settings.redis_url)),
            auditor=Auditor(
                engine, retention=settings.history_retention, limit=settings.history_buffer
            ),
            recorder=open_recorder(settings),
            idempotency_ttl=settings.api_idempotency_ttl,
        )

    def record_history(self, jobs: Sequence[Prepared]) -> None:
        """The jobs' history starts at their submission: enqueued, or scheduled."""
        queued = [job.job for job in jobs if job.at is None]
        scheduled = [(job.job, job.at) for job in jobs if job.at is not None]
        if queued:
            self.recorder.enqueued(queued)
        if scheduled:
            self.recorder.waiting("scheduled", scheduled, time.time())

    async def close(self) -> None:
        """At shutdown, on the event loop whose connections the submission writer holds."""
        self.auditor.close()
        self.recorder.close()
        await self.submissions.close()
