"""`gokiq-api`: the job history over HTTP (FastAPI on uvicorn), and the ingestion API
(`POST /v1/jobs`, `gokiq_ingest`).

`/v1/...` needs `Authorization: Bearer <token>`: a client's (`api_clients`, or one of
`api_tokens`, which may only read), compared in constant time (`gokiq_celery.api_clients`).
`/health` and `/metrics` are open, like the bridge's and the worker's; the server binds
127.0.0.1 unless `api_bind` says otherwise.
"""

import argparse
import gc
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

import gokiq_ingest
from gokiq_celery.logs import setup_logging
from gokiq_celery.settings import ConfigError, Settings, load_settings

from . import store
from .rows import STATES

log = logging.getLogger("gokiq.api")

State = Literal[
    "enqueued", "scheduled", "running", "succeeded", "retrying", "dead", "discarded", "dropped"
]
assert set(State.__args__) == set(STATES)  # type: ignore[attr-defined]
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: such a value matches nothing anyway
STATS_WINDOW = timedelta(hours=24)


class Error(BaseModel):
    detail: str


class Attempt(BaseModel):
    attempt: int | None = Field(description="1 for the first run, then Sidekiq's retry_count + 2")
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None = Field(description="the worker's outcome: ok, retry, dead, ...")
    error_class: str | None
    error_message: str | None
    worker: str | None
    runtime: float | None = Field(description="seconds")


class JobSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    jid: str
    job_class: str | None = Field(alias="class", description="the display class")
    queue: str | None
    args: str | None = Field(description="JSON, only with history_record_args")
    state: State
    attempts: int
    created_at: datetime
    enqueued_at: datetime | None
    due_at: datetime | None = Field(
        description="when it was due, as last seen waiting in `schedule` or `retry`"
    )
    first_started_at: datetime | None
    last_started_at: datetime | None
    finished_at: datetime | None
    error_class: str | None
    error_message: str | None
    error_at: datetime | None
    worker: str | None
    runtime: float | None = Field(description="seconds, of the last run")
    updated_at: datetime


class JobDetail(JobSummary):
    runs: list[Attempt] = Field(description="every run (attempt), oldest first")


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page")


class ClassCount(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    job_class: str = Field(alias="class")
    state: State
    count: int


class Stats(BaseModel):
    since: datetime
    total: int
    by_state: dict[str, int]
    by_class: list[ClassCount]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "no or unknown bearer token"},
    403: {"model": Error, "description": "a client that may not read the history"},
    503: {"model": Error, "description": "the history database is unavailable"},
}


def _not_a_number(value: Any) -> Any:
    """Times are RFC 3339 strings, as documented; pydantic would also take epoch numbers."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        raise ValueError("a date-time such as 2026-01-31T12:00:00Z, not a number")
    return value


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
Timestamp = Annotated[datetime, BeforeValidator(_not_a_number)]


async def _reject_unknown_parameters(request: Request) -> None:
    """`?status=dead` (for `state`) would otherwise list every job: a typo is an error."""
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:  # the shape of FastAPI's own 422 (HTTPValidationError), as documented
        raise RequestValidationError(
            [
                {"type": "extra_forbidden", "loc": ("query", name), "msg": "unknown parameter"}
                for name in unknown
            ]
        )


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


_TIME_FIELDS = (
    "created_at",
    "enqueued_at",
    "due_at",
    "first_started_at",
    "last_started_at",
    "finished_at",
    "error_at",
    "updated_at",
    "started_at",
)


def _timed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _time(v) if k in _TIME_FIELDS else v for k, v in row.items()}


def _json(model: BaseModel) -> Response:
    """A model validated once, as JSON: a returned model would be validated and serialised
    again against the route's response_model (which still documents it)."""
    return Response(model.model_dump_json(by_alias=True), media_type="application/json")


def _summary(row: dict[str, Any]) -> JobSummary:
    return JobSummary.model_validate(_timed(row))


def _once_more_if_reconnected(query, *args, **kwargs):
    """Run a read; if it failed on a connection the database had dropped (a restart), the pool
    has just been emptied, so run it once more on a fresh connection. This is what a pre-ping
    would do, without its round trip on every request."""
    try:
        return query(*args, **kwargs)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return query(*args, **kwargs)


class _CountRequests:
    """Requests by route and status, as plain ASGI (Starlette's BaseHTTPMiddleware costs ~1 ms
    a request)."""

    def __init__(self, app, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "(none)")
            self.counter.labels(route, str(status)).inc()


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The API on `settings.history_url` (or `engine`); nothing connects until a request.

    No pre-ping on the pool (a round trip per request): a read that fails on a connection the
    database dropped is run once more (`_once_more_if_reconnected`)."""
    engine = engine or store.open_engine(
        settings.history_url, pool_size=5, pre_ping=False, read_only=True
    )
    clients = settings.api_client_list
    registry = CollectorRegistry()
    requests = Counter(
        "gokiq_api_requests",
        "API requests by route and status",
        ["route", "status"],
        registry=registry,
    )
    bearer = HTTPBearer(auto_error=False, description="a client's token (api_clients, api_tokens)")

    async def authorized(  # async: no I/O, so no hop to the thread pool
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        client = clients.find(credentials.credentials if credentials else None)
        if client is None:
            raise HTTPException(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        if not client.read:
            raise HTTPException(403, "this client may not read the job history")

    app = FastAPI(
        dependencies=[Depends(_reject_unknown_parameters)],
        title="gokiq job history",
        version="1",
        description="What happened to each job gokiq ran: state, runs, errors.",
    )

    app.add_middleware(_CountRequests, counter=requests)

    @app.exception_handler(DBAPIError)
    async def database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("history database error: %s", type(exc.orig).__name__)
        return JSONResponse({"detail": "history database unavailable"}, status_code=503)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    def health() -> Any:
        try:
            _once_more_if_reconnected(store.ping, engine)
        except DBAPIError:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/jobs/{jid}",
        response_model=JobDetail,
        response_model_by_alias=True,
        responses={404: {"model": Error, "description": "no such job"}, **AUTH_ERRORS},
        dependencies=[Depends(authorized)],
    )
    def get_job(jid: Annotated[str, Path(max_length=200, pattern=NO_NUL)]) -> Any:
        found = _once_more_if_reconnected(store.get_job, engine, jid)
        if found is None:
            raise HTTPException(404, "no such job")
        job, runs = found
        detail = JobDetail.model_validate({**_timed(job), "runs": [_timed(r) for r in runs]})
        return _json(detail)

    @app.get(
        "/v1/jobs",
        response_model=JobPage,
        response_model_by_alias=True,
        responses={
            400: {"model": Error, "description": "a cursor not from this API"},
            **AUTH_ERRORS,
        },
        dependencies=[Depends(authorized)],
    )
    def list_jobs(
        job_class: Annotated[
            str | None, Query(alias="class", max_length=200, pattern=NO_NUL)
        ] = None,
        queue: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
        state: State | None = None,
        since: Annotated[Timestamp | None, Query(description="created at or after")] = None,
        until: Annotated[Timestamp | None, Query(description="created before")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=400)] = None,
    ) -> Any:
        """Newest first (by the job's created_at, then jid), one page at a time."""
        try:
            rows, next_cursor = _once_more_if_reconnected(
                store.list_jobs,
                engine,
                filters={"job_class": job_class, "queue": queue, "state": state},
                since=_epoch(since),
                until=_epoch(until),
                limit=limit,
                cursor=cursor,
            )
        except store.BadCursor:
            raise HTTPException(400, "bad cursor") from None
        return {"jobs": [_summary(r) for r in rows], "next_cursor": next_cursor}

    @app.get(
        "/v1/stats",
        response_model=Stats,
        response_model_by_alias=True,
        responses=AUTH_ERRORS,
        dependencies=[Depends(authorized)],
    )
    def stats(
        since: Annotated[
            Timestamp | None, Query(description="jobs created at or after; default: 24 h ago")
        ] = None,
    ) -> Any:
        start = _epoch(since) if since else time.time() - STATS_WINDOW.total_seconds()
        counts = _once_more_if_reconnected(store.stats, engine, start)
        by_state = dict.fromkeys(STATES, 0)
        for _, state, count in counts:
            by_state[state] = by_state.get(state, 0) + count
        return {
            "since": _time(start),
            "total": sum(by_state.values()),
            "by_state": by_state,
            "by_class": [{"class": c, "state": s, "count": n} for c, s, n in counts],
        }

    ingest = gokiq_ingest.mount(app, settings, clients, bearer)
    app.router.on_shutdown.append(ingest.close)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gokiq-api", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="PATH", help="YAML settings file")
    parser.add_argument("--bind", help="address (setting: api_bind; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (setting: api_port; default 9480)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, api_bind=args.bind, api_port=args.port)
        if not settings.history_url:
            raise ConfigError("history_url: required by gokiq-api (GOKIQ_HISTORY_URL)")
        if not len(settings.api_client_list):
            raise ConfigError(
                "api_clients or api_tokens: gokiq-api needs at least one client "
                "(GOKIQ_API_CLIENTS, api_clients_file or GOKIQ_API_TOKENS)"
            )
    except ConfigError as exc:
        print(f"gokiq-api: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    if settings.history_migrate:
        from .migrations import upgrade

        upgrade(settings.history_url)
    import uvicorn

    app = create_app(settings)
    young_objects_between_collections(GC_YOUNG)
    log.info("gokiq-api on http://%s:%s", settings.api_bind, settings.api_port)
    uvicorn.run(app, host=settings.api_bind, port=settings.api_port, log_config=None)
    return 0


# A bulk of 1,000 jobs allocates some 10,000 objects that live as long as its request. At
# the interpreter's default (700 between collections of the youngest generation) they were
# examined over and over while alive, promoted, and swept again by full collections of the
# whole heap (the history and audit buffers among it): about 30% of gokiq-api's CPU at bulk
# rates went to the collector (gc.callbacks on bench/ingest.py). Collected every 50,000, most
# die before a collection sees them.
GC_YOUNG = 50_000


def young_objects_between_collections(n: int) -> None:
    """The collector's first threshold for this process (the older generations' stay)."""
    gc.set_threshold(n, *gc.get_threshold()[1:])


if __name__ == "__main__":
    sys.exit(main())
