"""The ingestion API of `gokiq-api`: `POST /v1/jobs` and `POST /v1/jobs/bulk` let services that
are not Ruby enqueue the Rails app's jobs, validated against the app's real job classes (the
sidecar's `GET /classes`), authenticated, rate-limited and audited. `mount(app, settings)` adds
it to the API (gokiq_history.api)."""

from .router import mount

__all__ = ["mount"]
