"""SidecarClient against a real HTTP server (the stand-in sidecar) and a real redis-server: what
each answer means, timeouts, and the circuit breaker whose state the workers share in Redis."""

from __future__ import annotations

import ssl
import subprocess
import time

import pybreaker
import pytest
import redis

from gokiq_celery.connection import SidecarConnection
from gokiq_celery.settings import load_settings
from gokiq_celery.sidecar import SidecarClient, SidecarUnavailable
from gokiq_celery.sidekiq import Job
from gokiq_celery.sidekiq.breaker import SharedBreakerStorage
from gokiq_celery.sidekiq.keys import BREAKER_NAMESPACE

from .conftest import free_port
from .stand_in_sidecar import TOKEN, StandInSidecar


@pytest.fixture(scope="module")
def sidecar():
    with StandInSidecar() as server:
        yield server


def client(redis_url, url, **overrides) -> SidecarClient:
    settings = load_settings(redis_url=redis_url, sidecar_url=url, sidecar_token=TOKEN, **overrides)
    return SidecarClient(settings, redis.Redis.from_url(redis_url))


def job(cls: str, *args, jid: str | None = None) -> Job:
    return Job.build({"class": cls, "args": list(args), "jid": jid or f"{time.time_ns():024x}"})


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def shared_state(redis_client) -> tuple[bytes, bytes]:
    names = [f"{BREAKER_NAMESPACE}:pybreaker:{key}" for key in ("state", "fail_counter")]
    return tuple(redis_client.mget(names))


def test_answers_map_to_executions(sidecar, redis_url):
    worker = client(redis_url, sidecar.url)
    ok = worker.execute(job("OkJob", 1), "critical")
    assert (ok.status, ok.succeeded, ok.execution_time) == ("ok", True, 0.001)
    assert sidecar.calls["execute"][-1]["queue"] == "critical"
    failed = worker.execute(job("FailJob", 30), "default")
    assert failed.status == "failed" and not failed.succeeded
    assert (failed.failure.error_class, failed.failure.error_message) == ("ArgumentError", "boom")
    assert failed.failure.retry_in == 30 and len(failed.failure.backtrace) == 3
    unknown = worker.execute(job("NoSuchJob"), "default")
    assert (unknown.status, unknown.failure.error_class) == ("invalid_class", "NameError")


def test_a_path_prefix_in_the_sidecar_url_is_kept(sidecar, redis_url):
    # The stand-in serves every path; what matters is that the prefix reaches it.
    client(redis_url, sidecar.url + "/gokiq/").execute(job("OkJob"), "default")
    assert sidecar.paths[-1] == "/gokiq/jobs/execute"


def test_a_job_slower_than_job_timeout_is_a_failure_of_the_job(sidecar, redis_url):
    slow = client(redis_url, sidecar.url, job_timeout=0.3).execute(job("SlowJob", 1), "default")
    assert (slow.status, slow.failure.error_class) == ("failed", "Gokiq::JobTimeout")


def test_calls_share_one_keep_alive_connection(sidecar, redis_url):
    worker = client(redis_url, sidecar.url)
    for n in range(5):
        assert worker.execute(job("OkJob", n), "default").succeeded
    assert len(set(sidecar.peers[-5:])) == 1


def test_a_connection_the_server_closed_is_replaced(sidecar, redis_url, monkeypatch):
    worker = client(redis_url, sidecar.url)
    assert worker.execute(job("CloseJob"), "default").succeeded  # says `Connection: close`
    assert worker.execute(job("OkJob"), "default").succeeded
    assert sidecar.peers[-1] != sidecar.peers[-2]
    # A connection the server dropped while idle (Puma's keep-alive timeout) is found closed
    # before it is used again, so the job is not put back for nothing.
    assert worker.execute(job("HangUpJob"), "default").succeeded
    monkeypatch.setattr(SidecarConnection, "IDLE_CHECK", 0.0)
    time.sleep(0.1)
    assert worker.execute(job("OkJob"), "default").succeeded
    assert sidecar.peers[-1] != sidecar.peers[-2]


def test_a_queue_name_no_header_can_carry_is_left_out(sidecar, redis_url):
    worker = client(redis_url, sidecar.url)
    worker.execute(job("OkJob"), "evil\r\nX-Injected: 1")
    assert sidecar.calls["execute"][-1]["queue"] == ""  # the sidecar uses the payload's queue
    worker.execute(job("OkJob"), "ünïcode")
    assert sidecar.calls["execute"][-1]["queue"] == ""


def test_a_wrong_token_is_unavailable_not_a_failure(sidecar, redis_url):
    settings = load_settings(redis_url=redis_url, sidecar_url=sidecar.url, sidecar_token="wrong")
    with pytest.raises(SidecarUnavailable, match="HTTP 401"):
        SidecarClient(settings, redis.Redis.from_url(redis_url)).execute(job("OkJob"), "default")


def test_one_workers_failures_open_the_breaker_for_every_worker(sidecar, redis_url, redis_client):
    broken = client(redis_url, down_url(), breaker_fail_max=3)
    for _ in range(3):
        with pytest.raises(SidecarUnavailable):
            broken.execute(job("OkJob"), "default")
    assert shared_state(redis_client)[0] == b"open"
    calls = len(sidecar.calls["execute"])
    healthy = client(redis_url, sidecar.url, breaker_fail_max=3)  # another worker process
    with pytest.raises(SidecarUnavailable, match="circuit open"):
        healthy.execute(job("OkJob"), "default")
    assert len(sidecar.calls["execute"]) == calls  # the sidecar was not called


def test_a_success_resets_failures_other_workers_counted(sidecar, redis_url, redis_client):
    broken = client(redis_url, down_url(), breaker_fail_max=5)
    for _ in range(2):
        with pytest.raises(SidecarUnavailable):
            broken.execute(job("OkJob"), "default")
    assert shared_state(redis_client) == (b"closed", b"2")
    client(redis_url, sidecar.url, breaker_fail_max=5).execute(job("OkJob"), "default")
    assert shared_state(redis_client) == (b"closed", b"0")


def test_closed_breaker_reads_redis_once_per_refresh_and_writes_nothing(redis_client):
    now = [0.0]
    storage = SharedBreakerStorage(redis_client, refresh=0.25, clock=lambda: now[0])
    redis_client.config_resetstat()
    for _ in range(100):  # what 100 successful calls within one refresh interval do
        assert storage.state == pybreaker.STATE_CLOSED
        storage.reset_counter()
    now[0] += 0.3
    assert storage.state == pybreaker.STATE_CLOSED
    commands = redis_client.info("commandstats")
    assert commands["cmdstat_mget"]["calls"] == 2
    assert "cmdstat_set" not in commands and "cmdstat_get" not in commands


def test_a_trip_elsewhere_is_seen_within_the_refresh_interval(redis_client):
    now = [0.0]
    storage = SharedBreakerStorage(redis_client, refresh=0.25, clock=lambda: now[0])
    assert storage.state == pybreaker.STATE_CLOSED
    other = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis_client, namespace=BREAKER_NAMESPACE
    )
    other.state = pybreaker.STATE_OPEN
    assert storage.state == pybreaker.STATE_CLOSED  # still within the interval
    now[0] += 0.25
    assert storage.state == pybreaker.STATE_OPEN
    storage.state = pybreaker.STATE_HALF_OPEN  # our own writes are seen at once, here and there
    assert storage.state == pybreaker.STATE_HALF_OPEN == other.state


@pytest.fixture(scope="module")
def tls_sidecar(tmp_path_factory):
    """The stand-in behind TLS, with a certificate for 127.0.0.1 made for this test."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with StandInSidecar(tls=context) as server:
        server.cert = cert
        yield server


def test_an_https_sidecar_is_verified_and_kept_alive(tls_sidecar, redis_url, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_sidecar.cert))  # trust the test's certificate
    worker = client(redis_url, tls_sidecar.url)
    for n in range(3):
        assert worker.execute(job("OkJob", n), "default").succeeded
    assert len(set(tls_sidecar.peers[-3:])) == 1


def test_an_https_sidecar_with_an_untrusted_certificate_is_unavailable(tls_sidecar, redis_url):
    with pytest.raises(SidecarUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        client(redis_url, tls_sidecar.url).execute(job("OkJob"), "default")
