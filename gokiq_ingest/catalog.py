"""The app's job classes, as its sidecar reports them (`GET /classes`), cached.

The list is read again every `api_classes_refresh` seconds, by a thread of its own while the
last list serves the requests. When the sidecar cannot be reached, the last list read is kept;
with none yet, `CatalogUnavailable` (the API answers 503: it cannot tell a job of the app from
anything else).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gokiq.ingest")


class CatalogUnavailable(RuntimeError):
    """The sidecar's list of job classes could not be read, and none was read before."""


@dataclass(frozen=True)
class JobClass:
    name: str
    kind: str  # "sidekiq" or "active_job"
    queue: str | None  # None: decided per job by the app (a block)
    sidekiq_options: Mapping[str, Any]
    priority: int | None = None

    @property
    def active_job(self) -> bool:
        return self.kind == "active_job"


@dataclass(frozen=True)
class Catalog:
    classes: Mapping[str, JobClass]
    rails_version: str | None = None
    active_job: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Catalog:
        classes = {
            c["class"]: JobClass(
                name=c["class"],
                kind=c["kind"],
                queue=c.get("queue") or None,
                sidekiq_options=c.get("sidekiq_options") or {},
                priority=c.get("priority"),
            )
            for c in data["classes"]
        }
        return cls(classes, data.get("rails_version"), data.get("active_job") or {})


def sidecar_fetcher(url: str, token: str, timeout: float = 5.0) -> Callable[[], Catalog]:
    """Reads `<sidecar>/classes` with the sidecar's bearer token."""

    def fetch() -> Catalog:
        request = urllib.request.Request(
            url.rstrip("/") + "/classes", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Catalog.parse(json.loads(reply.read()))

    return fetch


class JobCatalog:
    def __init__(self, fetch: Callable[[], Catalog], refresh: float) -> None:
        self._fetch = fetch
        self._refresh = refresh
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._read_at = float("-inf")

    @property
    def ready(self) -> bool:
        """A list has been read: `current` answers at once."""
        return self._catalog is not None

    def current(self) -> Catalog:
        if self._due():
            if self._catalog is None:
                with self._lock:  # nothing to serve yet: wait for the one reader
                    if self._due():
                        self._read()
            elif self._lock.acquire(blocking=False):
                # A list to serve: it is read again in the background, and no request waits
                # for the sidecar (its GET /classes took 8-170 ms on a loaded machine).
                threading.Thread(target=self._read_and_release, daemon=True).start()
        if self._catalog is None:
            raise CatalogUnavailable("the app's job classes are unknown: its sidecar is down")
        return self._catalog

    def _due(self) -> bool:
        return time.monotonic() - self._read_at >= self._refresh

    def _read_and_release(self) -> None:
        try:
            if self._due():
                self._read()
        finally:
            self._lock.release()

    def _read(self) -> None:
        self._read_at = time.monotonic()
        try:
            self._catalog = self._fetch()
        except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read the app's job classes from its sidecar: %s", exc)
            if self._catalog is None:  # nothing to serve: ask again in a second, not later
                self._read_at -= max(self._refresh - 1.0, 0.0)
