"""`gokiq-api` as a live uvicorn server on a real PostgreSQL (and SQLite): auth, the job, its
runs, keyset pages, stats, and a schemathesis run against its OpenAPI document (no 500, no
schema violation)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from gokiq_celery.settings import Settings
from gokiq_history import migrations, store
from gokiq_history.api import create_app
from gokiq_history.rows import attempt_event, job_event

from .history_support import pg_admin_url, pg_url
from .live_api import LiveServer

__all__ = ["pg_admin_url", "pg_url"]  # fixtures used below

TOKEN = "test-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class LiveApi(LiveServer):
    def __init__(self, url: str) -> None:
        super().__init__(create_app(Settings(history_url=url, api_tokens=f"other-token, {TOKEN}")))

    def get(self, path: str, headers=AUTH, **params) -> requests.Response:
        return requests.get(self.base + path, headers=headers, params=params, timeout=10)


def seed(url: str) -> None:
    now = time.time()
    rows = [
        job_event(f"jid-{n:03d}", ("succeeded", "dead", "retrying")[n % 3], now - 100 + n,
                  job_class=("HardJob", "MailJob")[n % 2], queue="default", attempts=1)
        for n in range(60)
    ]  # fmt: skip
    runs = [
        attempt_event("jid-001", now - 50, attempt=1, finished_at=now - 49, outcome="dead",
                      error_class="RuntimeError", error_message="boom", worker="w1", runtime=1.0)
    ]  # fmt: skip
    engine = store.open_engine(url)
    store.write_batch(engine, rows, runs)
    engine.dispose()


@pytest.fixture(scope="module")
def pg_api(pg_url) -> Iterator[LiveApi]:
    migrations.upgrade(pg_url)
    seed(pg_url)
    live = LiveApi(pg_url).start()
    yield live
    live.stop()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def api(request, tmp_path_factory) -> Iterator[LiveApi]:
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_api")
        return
    url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'history.sqlite3'}"
    migrations.upgrade(url)
    seed(url)
    live = LiveApi(url).start()
    yield live
    live.stop()


def test_v1_needs_one_of_the_tokens(api):
    assert api.get("/v1/jobs", headers={}).status_code == 401
    assert api.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    other = api.get("/v1/jobs", headers={"Authorization": "Bearer other-token"})
    assert other.status_code == 200
    assert api.get("/health", headers={}).json() == {"status": "ok"}


def test_a_job_with_its_runs_and_404_for_an_unknown_one(api):
    body = api.get("/v1/jobs/jid-001").json()
    assert (body["jid"], body["class"], body["state"]) == ("jid-001", "MailJob", "dead")
    assert [(r["attempt"], r["outcome"], r["error_class"]) for r in body["runs"]] == [
        (1, "dead", "RuntimeError")
    ]
    missing = api.get("/v1/jobs/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "no such job"})


def test_pages_newest_first_with_filters(api):
    seen, cursor = [], None
    while True:
        params = {"class": "HardJob", "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/jobs", **params).json()
        seen += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [j["jid"] for j in seen] == [f"jid-{n:03d}" for n in range(58, -1, -2)]
    dead = api.get("/v1/jobs", state="dead", limit=500).json()["jobs"]
    assert len(dead) == 20 and {j["state"] for j in dead} == {"dead"}
    assert api.get("/v1/jobs", cursor="garbage").status_code == 400
    assert api.get("/v1/jobs", state="sleeping").status_code == 422


def test_stats_count_by_state_and_class(api):
    body = api.get("/v1/stats").json()
    assert body["total"] == 60
    assert body["by_state"]["dead"] == 20 and body["by_state"]["running"] == 0
    assert {"class": "HardJob", "state": "succeeded", "count": 10} in body["by_class"]
    future = api.get("/v1/stats", since="2999-01-01T00:00:00Z").json()
    assert future["total"] == 0


def test_metrics_count_requests(api):
    api.get("/v1/jobs/nope")
    text = api.get("/metrics", headers={}).text
    assert 'gokiq_api_requests_total{route="/v1/jobs/{jid}",status="404"}' in text


# Every operation the document lists (test_every_operation_is_fuzzed keeps this true).
OPERATIONS = ["/health", "/metrics", "/v1/jobs", "/v1/jobs/{jid}", "/v1/stats"]


@pytest.fixture(scope="module")
def api_schema(pg_api):
    return schemathesis.openapi.from_url(pg_api.base + "/openapi.json")


# The ingestion routes (POST) are fuzzed by tests/test_ingest.py, with a sidecar and a Redis.
INGEST_OPERATIONS = ["/v1/jobs", "/v1/jobs/bulk"]


def test_every_operation_is_fuzzed(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == {f"GET {path}" for path in OPERATIONS} | {
        f"POST {path}" for path in INGEST_OPERATIONS
    }


WITH_PARAMETERS = ["/v1/jobs", "/v1/jobs/{jid}", "/v1/stats"]  # invalid input only exists here


def text_parameters(api_schema, path: str) -> set[str]:
    """The names of the operation's query parameters whose schema allows a string."""

    def allows_text(schema: dict) -> bool:
        return schema.get("type") == "string" or any(map(allows_text, schema.get("anyOf", [])))

    parameters = api_schema.raw_schema["paths"][path]["get"].get("parameters", [])
    return {p["name"] for p in parameters if p["in"] == "query" and allows_text(p["schema"])}


@pytest.mark.parametrize(
    ("path", "mode"),
    [(p, GenerationMode.POSITIVE) for p in OPERATIONS]
    + [(p, GenerationMode.NEGATIVE) for p in WITH_PARAMETERS],
)
def test_the_api_matches_its_openapi_document(api_schema, path, mode):
    """schemathesis' generated requests (valid ones, then invalid ones): never a 500, every
    response as the document says (status, content type, headers, body schema)."""
    operation = api_schema[path]["GET"]
    text = text_parameters(api_schema, path)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        if mode is GenerationMode.POSITIVE and case.query:
            # A made-up cursor is schema-valid yet not one this API handed out: 400, by design
            # (test_pages_newest_first_with_filters); schemathesis would call that a rejection.
            case.query.pop("cursor", None)
        if any(isinstance(v, dict) or v == [] for v in (case.query or {}).values()):
            # No URL form: an object is flattened into a valid string, an empty list vanishes
            # (an unknown parameter, the request's only fault, sent as no parameter at all).
            return
        if mode is GenerationMode.NEGATIVE and any(
            name in text and isinstance(value, int | float)
            for name, value in (case.query or {}).items()
        ):
            # Nor a number (or a boolean) for a text parameter: a URL carries it as text, which
            # is valid (`queue=5.68e+16`), so the "invalid" request is rightly accepted.
            return
        case.call_and_validate(headers=AUTH)

    check()
