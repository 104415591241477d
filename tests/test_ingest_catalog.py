"""The cache of the app's job classes (gokiq_ingest.catalog): the first read is waited for, a
refresh never is (it runs in the background while the last list serves), a sidecar that went
away leaves the last list in place. The live sidecar's `GET /classes` is read by
tests/test_ingest.py; here a function stands in for it, to control its timing."""

from __future__ import annotations

import threading
import time

import pytest

from gokiq_ingest.catalog import Catalog, CatalogUnavailable, JobCatalog


def catalog(*names: str) -> Catalog:
    return Catalog.parse({"classes": [{"class": n, "kind": "sidekiq"} for n in names]})


def test_a_refresh_runs_in_the_background_while_the_last_list_serves():
    answers = [catalog("HardJob"), catalog("HardJob", "NewJob")]
    release = threading.Event()
    calls = []

    def fetch() -> Catalog:
        calls.append(time.monotonic())
        if len(calls) == 2:
            assert release.wait(10)  # the sidecar is slow to answer the refresh
        return answers[len(calls) - 1]

    classes = JobCatalog(fetch, refresh=0.05)
    assert set(classes.current().classes) == {"HardJob"}  # the first read is waited for
    time.sleep(0.06)
    started = time.monotonic()
    for _ in range(20):  # due, and the refresh is held: every call still answers at once
        assert set(classes.current().classes) == {"HardJob"}
    assert time.monotonic() - started < 1.0
    assert len(calls) == 2  # one refresh, not one per call
    release.set()
    deadline = time.monotonic() + 5
    while set(classes.current().classes) != {"HardJob", "NewJob"}:
        assert time.monotonic() < deadline, "the refreshed list never served"
        time.sleep(0.01)


def test_no_list_yet_is_unavailable_and_a_lost_sidecar_keeps_the_last():
    up = [False]

    def fetch() -> Catalog:
        if not up[0]:
            raise OSError("connection refused")
        return catalog("HardJob")

    classes = JobCatalog(fetch, refresh=0.05)
    with pytest.raises(CatalogUnavailable):
        classes.current()
    up[0] = True
    classes._read_at = float("-inf")  # the retry a second later, now
    assert set(classes.current().classes) == {"HardJob"}
    up[0] = False
    time.sleep(0.06)
    for _ in range(5):
        assert set(classes.current().classes) == {"HardJob"}
        time.sleep(0.02)
