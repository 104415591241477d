"""The app's Sidekiq version: parsed from the setting or learned from what the sidecar
publishes in Sidekiq's Redis (a real redis-server), and nothing version-dependent written
before it is known."""

from __future__ import annotations

import logging
import os

import pytest
import redis

from gokiq_celery.settings import ConfigError, load_settings
from gokiq_celery.sidekiq import Job, SidekiqStore
from gokiq_celery.sidekiq.keys import SIDEKIQ_VERSION_KEY, process_work_keys
from gokiq_celery.sidekiq.version import (
    SidekiqVersion,
    SidekiqVersionResolver,
    SidekiqVersionUnknown,
)
from gokiq_celery.worker import Worker

from .conftest import free_port
from .stand_in_sidecar import TOKEN, StandInSidecar


@pytest.mark.parametrize(
    ("text", "release"),
    [("6", (6,)), ("7", (7,)), ("8", (8,)), ("6.4.1", (6, 4, 1)), ("7.3.9", (7, 3, 9)),
     ("8.0.0.beta1", (8, 0, 0)), (" 7.0 ", (7, 0))],
)  # fmt: skip
def test_versions_gokiq_speaks(text, release):
    assert SidekiqVersion.parse(text).release == release


@pytest.mark.parametrize("text", ["5", "5.2.0", "9.0", "x", "", "auto", "6..4", "v7"])
def test_versions_gokiq_does_not_speak(text):
    with pytest.raises(ValueError):
        SidekiqVersion.parse(text)


def test_before_says_nothing_when_the_version_names_too_little():
    v = SidekiqVersion.parse
    assert v("6.4.1").before(6, 4, 2) is True
    assert v("6.4.2").before(6, 4, 2) is False and v("6.5").before(6, 4, 2) is False
    assert v("6.3").before(6, 4, 2) is True and v("7").before(6, 4, 2) is False
    assert v("6").before(6, 4, 2) is None and v("6.4").before(6, 4, 2) is None


@pytest.mark.parametrize("value", ["auto", "AUTO", "6", "7", "8", "6.4.1", "7.3.9"])
def test_settings_take_auto_a_major_or_a_full_version(value):
    assert load_settings(environ={"GOKIQ_SIDEKIQ_VERSION": value}).sidekiq_version == value


@pytest.mark.parametrize("value", ["5", "9", "6.x.1", "latest"])
def test_settings_refuse_other_versions_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^sidekiq_version: must be auto, 6, 7, 8"):
        load_settings(environ={"GOKIQ_SIDEKIQ_VERSION": value})


def test_the_default_is_auto():
    assert load_settings(environ={}).sidekiq_version == "auto"


def test_the_busy_page_hash_is_the_one_the_version_reads():
    v = SidekiqVersion.parse
    assert process_work_keys("h:1:a", v("6.4.1")) == ["h:1:a:workers"]
    assert process_work_keys("h:1:a", v("6.4.2")) == ["h:1:a:work"]
    assert process_work_keys("h:1:a", v("7.3.9")) == ["h:1:a:work"]
    assert process_work_keys("h:1:a", v("6")) == ["h:1:a:workers", "h:1:a:work"]


# -- the resolver, against a real Redis --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_auto_learns_what_the_sidecar_published_and_reads_it_again_later(redis_client):
    store, clock = SidekiqStore(redis_client), Clock()
    versions = SidekiqVersionResolver("auto", store.published_sidekiq_version, 60, clock)
    assert versions.current() is None
    with pytest.raises(SidekiqVersionUnknown, match="GOKIQ_SIDEKIQ_VERSION"):
        versions.require()

    redis_client.set(SIDEKIQ_VERSION_KEY, "6.4.1")  # what every sidecar does when it boots
    assert versions.require() == SidekiqVersion((6, 4, 1))
    redis_client.set(SIDEKIQ_VERSION_KEY, "7.3.9")  # the app upgraded, its sidecar restarted
    assert versions.require().release == (6, 4, 1)  # read again only every `refresh` seconds
    clock.now = 60
    assert versions.require().release == (7, 3, 9)


def test_fresh_says_when_current_answers_without_reading_redis(redis_client):
    """gokiq-api prepares a job on its event loop only while the version is fresh."""
    store, clock = SidekiqStore(redis_client), Clock()
    reads: list[str | None] = []

    def read() -> str | None:
        reads.append(text := store.published_sidekiq_version())
        return text

    versions = SidekiqVersionResolver("auto", read, 60, clock)
    assert not versions.fresh and versions.current() is None
    assert not versions.fresh  # nothing published: every call reads
    redis_client.set(SIDEKIQ_VERSION_KEY, "7.3.9")
    assert versions.current().release == (7, 3, 9) and versions.fresh
    clock.now = 59.9
    assert versions.fresh and versions.current().release == (7, 3, 9)
    assert reads == [None, "7.3.9"]
    clock.now = 60
    assert not versions.fresh
    assert SidekiqVersionResolver("6.4.1", read).fresh


def test_a_configured_version_wins_over_the_published_one(redis_client):
    redis_client.set(SIDEKIQ_VERSION_KEY, "7.3.9")
    store = SidekiqStore(redis_client)
    assert SidekiqVersionResolver("6", store.published_sidekiq_version).require().release == (6,)
    auto = SidekiqVersionResolver("auto", store.published_sidekiq_version)
    assert auto.require().release == (7, 3, 9)


def test_a_known_version_survives_redis_going_away(redis_client):
    redis_client.set(SIDEKIQ_VERSION_KEY, "7.3.9")
    store, clock = SidekiqStore(redis_client), Clock()
    versions = SidekiqVersionResolver("auto", store.published_sidekiq_version, 60, clock)
    assert versions.require().major == 7
    store.redis = redis.Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens
    clock.now = 120
    assert versions.require().release == (7, 3, 9)
    unknown = SidekiqVersionResolver("auto", store.published_sidekiq_version)
    assert unknown.current() is None


def test_an_unusable_published_version_stays_unknown_and_is_logged_once(redis_client, caplog):
    redis_client.set(SIDEKIQ_VERSION_KEY, "5.2.4")
    versions = SidekiqVersionResolver("auto", SidekiqStore(redis_client).published_sidekiq_version)
    with caplog.at_level(logging.ERROR, logger="gokiq"):
        assert versions.current() is None and versions.current() is None
    [logged] = [r.getMessage() for r in caplog.records if "5.2.4" in r.getMessage()]
    assert logged == "a sidecar published Sidekiq '5.2.4', which gokiq cannot use: " + (
        "Sidekiq 5.2.4 is not 6, 7 or 8"
    )


# -- a worker that cannot learn the version yet -------------------------------------------------


def test_a_failure_before_the_version_is_known_puts_the_job_back_unchanged(redis_url):
    """No retry written in a format that may be wrong: the job goes back as if the sidecar had
    been unavailable (nothing is published under the version key here)."""
    with StandInSidecar() as sidecar:
        settings = load_settings(redis_url=redis_url, sidecar_url=sidecar.url, sidecar_token=TOKEN)
        worker = Worker.from_settings(settings)
        job = Job.build({"class": "FailJob", "args": [], "jid": os.urandom(12).hex(), "retry": 3})
        assert worker.perform(job.text, "default") == "unavailable"
        assert len(sidecar.executed(job.jid)) == 1
    store = worker.store
    assert store.queues.jobs("default") == [job.raw]  # byte for byte: no retry_count, no failed_at
    assert store.scheduled.retry_set() == [] and store.dead.entries() == []
    assert store.stats.counts() == {"processed": 0, "failed": 0}
