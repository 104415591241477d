"""`POST /v1/jobs` and `POST /v1/jobs/bulk`, mounted on gokiq-api by `mount`.

A submission is checked in this order, and the first failure is its answer (each one audited):
401 no or unknown token; 413 body over `api_max_body_bytes`; 400 malformed JSON or fields;
403 a class or queue the client may not use; 422 not a job class of the app (the sidecar's
`GET /classes`) or arguments that are not strict JSON; 429 over the client's rate (with
`Retry-After`); 503 while Redis (or the app's class list, or its Sidekiq version) cannot be
had. 201 and the jid come only after Redis has taken the write. A 503 after the write was
sent says `"written": "maybe"`: the same request again with the same `Idempotency-Key`
enqueues it at most once.
"""

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gokiq_celery.api_clients import ApiClient, ApiClients
from gokiq_celery.settings import Settings
from gokiq_celery.sidekiq.job import dumps
from gokiq_celery.sidekiq.submissions import Outcome, Rate, Unreachable
from gokiq_celery.sidekiq.version import SidekiqVersionUnknown

from . import audit
from .catalog import CatalogUnavailable
from .jobs import (
    BulkRequest,
    JobRequest,
    PlainBulk,
    PlainJob,
    Preparation,
    Prepared,
    Refused,
    class_and_queue,
    plain_bulk,
)
from .service import Ingest

log = logging.getLogger("gokiq.ingest")

# A bulk waits up to this long, on the event loop, for room in the audit's buffer while the
# database takes its batches, rather than have its rows dropped: bulks faster than the database
# slow to the audit's pace. A database that refuses the rows (down) is not waited for: they are
# dropped and counted, as the history's.
AUDIT_WAIT = 5.0

INGEST_PATHS = ("/v1/jobs", "/v1/jobs/bulk")
IDEMPOTENCY_KEY_MAX = 200


class Error(BaseModel):
    detail: str


class Unavailable(BaseModel):
    detail: str
    written: Literal["no", "maybe"] = Field(
        description="maybe: Redis may have taken the jobs; send the same request again with "
        "the same Idempotency-Key to be sure they are enqueued once"
    )
    jids: list[str] = Field(default_factory=list, description="the jids the jobs were given")


class Accepted(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    jid: str
    job_class: str = Field(alias="class")
    queue: str
    at: float | None = Field(None, description="when it runs (epoch seconds), if scheduled")


class JobResult(BaseModel):
    status: int = Field(description="201 enqueued, else why not: 400, 403 or 422")
    jid: str | None = None
    queue: str | None = None
    detail: str | None = None


class BulkAccepted(BaseModel):
    accepted: int
    refused: int
    jobs: list[JobResult] = Field(description="one per submitted job, in order")


RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "malformed JSON or fields"},
    401: {"model": Error, "description": "no or unknown bearer token"},
    413: {"model": Error, "description": "body over api_max_body_bytes"},
    422: {"model": Error, "description": "Idempotency-Key reused for another request"},
    429: {"model": Error, "description": "over the client's rate", "headers": RETRY_AFTER},
    503: {"model": Unavailable, "description": "Redis, the sidecar or the version unknown"},
}
SINGLE_ERRORS = {
    **ERRORS,
    403: {"model": Error, "description": "class or queue not allowed for this client"},
    422: {"model": Error, "description": "not a job class of the app; args not strict JSON"},
}


class TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """413 for a submission body over the limit, declared or streamed, before it is read
    whole (pure ASGI: FastAPI would buffer any size)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in INGEST_PATHS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"detail": "request body too large"}, 413)(scope, receive, send)
            _audit_refusal(scope, 413, "request body too large")
            return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise TooLarge()  # FastAPI passes an HTTPException on: our 413
            return message

        await self.app(scope, limited, send)


def _audit_refusal(scope, status: int, reason: str) -> None:
    ingest: Ingest | None = getattr(scope["app"].state, "ingest", None)
    if ingest is None:
        return
    headers = dict(scope["headers"])
    token = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ")
    client = ingest.clients.find(token.strip() or None)
    source = scope.get("client")
    ingest.auditor.record(
        [
            audit.event(
                status,
                client=client.name if client else None,
                source_ip=source[0] if source else None,
                reason=reason,
            )
        ]
    )


def _problems(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "malformed request"


def mount(app: FastAPI, settings: Settings, clients: ApiClients, bearer: HTTPBearer) -> Ingest:
    """Adds the ingestion routes to `app`, with their body limit and 400 for malformed input."""
    ingest = Ingest.from_settings(settings, clients)
    app.state.ingest = ingest
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)

    async def malformed(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if request.method != "POST" or request.url.path not in INGEST_PATHS:
            return await request_validation_exception_handler(request, exc)
        detail = _problems(exc)
        _audit_refusal(request.scope, 400, detail)
        return JSONResponse({"detail": detail}, 400)

    async def unavailable(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _Unavailable)
        return JSONResponse(exc.body, 503)

    app.add_exception_handler(RequestValidationError, malformed)
    app.add_exception_handler(_Unavailable, unavailable)
    app.include_router(_router(ingest, bearer))
    return ingest


ContextOf = Callable[[Request], Awaitable["Context | None"]]


def _direct_route(context_of: ContextOf) -> type[APIRoute]:
    """The ingestion routes' class: FastAPI's own handler (its dependencies solved and checked
    on each request) cost about a third of gokiq-api's CPU per submission (py-spy on
    bench/ingest.py), so a submission of the usual shape is handled directly: no query
    string, a JSON body that its model validates, an Idempotency-Key that fits. Its client
    comes from the very dependencies FastAPI would call (`context_of`). Anything else goes to
    FastAPI's handler, which answers it as it always did (each error, its audit), and the
    OpenAPI document is still FastAPI's, from the routes' signatures."""

    class DirectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            return _direct_handler(super().get_route_handler(), self.endpoint, context_of)

    return DirectRoute


def _direct_handler(
    fastapi_handler: Callable[[Request], Awaitable[Response]],
    endpoint: Callable[[Any, "Context"], Awaitable[Any]],
    context_of: ContextOf,
) -> Callable[[Request], Awaitable[Response]]:
    model: type[BaseModel] = next(iter(inspect.signature(endpoint).parameters.values())).annotation

    async def handle(request: Request) -> Response:
        body = await _body(request, model)
        context = await context_of(request) if body is not None else None
        if context is None:
            return await fastapi_handler(request)
        return await endpoint(body, context)

    return handle


async def _body(request: Request, model: type[BaseModel]) -> BaseModel | PlainBulk | None:
    """The body as `model`, or None for FastAPI's handler to answer (the body stays cached
    on the request). FastAPI parses it with `json.loads`, then the model; pydantic's own JSON
    parser, over the bytes, gives the same model for the same body at a third less CPU (a
    bulk's validation was a fifth of its CPU: py-spy on bench/ingest.py). It refuses a few
    bodies `json.loads` takes (a byte order mark, a lone surrogate's escape): those are
    parsed as FastAPI does."""
    if request.scope["query_string"] or request.headers.get("content-type") != "application/json":
        return None
    try:
        raw = await request.body()
    except HTTPException:  # our 413, from BodyLimit
        raise
    except Exception:  # a body that cannot be read: FastAPI's 400
        return None
    # A bulk of plain jobs as `PlainBulk`; with an Idempotency-Key (whose digest is of the
    # `BulkRequest` model) or any other job, as the model.
    keyed = "idempotency-key" in request.headers
    if model is BulkRequest and not keyed and (plain := plain_bulk(raw)) is not None:
        return plain
    try:
        return model.model_validate_json(raw)
    except Exception:
        pass
    try:
        return model.model_validate(json.loads(raw))
    except Exception:  # not JSON, or not valid: FastAPI's 400 says why
        return None


def _router(ingest: Ingest, bearer: HTTPBearer) -> APIRouter:
    async def submitter(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> ApiClient:
        client = ingest.clients.find(credentials.credentials if credentials else None)
        if client is None:
            _audit_refusal(request.scope, 401, "no or unknown bearer token")
            raise HTTPException(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        return client

    Key = Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=IDEMPOTENCY_KEY_MAX,
            description="the same key again (within api_idempotency_ttl) replays the first "
            "answer and enqueues nothing",
        ),
    ]

    async def context(
        request: Request,
        client: Annotated[ApiClient, Depends(submitter)],
        idempotency_key: Key = None,
    ) -> Context:
        source = request.client.host if request.client else None
        return Context(ingest, client, source, idempotency_key)

    Submitted = Annotated[Context, Depends(context)]  # the client, its address, its key

    async def direct_context(request: Request) -> Context | None:
        """`context`, its dependencies called as FastAPI calls them (None: a key too long,
        which FastAPI's handler answers)."""
        key = request.headers.get("idempotency-key")
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            return None
        client = await submitter(request, await bearer(request))
        return await context(request, client, key)

    router = APIRouter(tags=["ingestion"], route_class=_direct_route(direct_context))

    @router.post(
        "/v1/jobs",
        status_code=201,
        response_model=Accepted,
        response_model_by_alias=True,
        responses=SINGLE_ERRORS,
        summary="Enqueue one job of the app",
    )
    async def submit(job: JobRequest, context: Submitted) -> Any:
        prepared = await context.prepared(job)
        if isinstance(prepared, Refused):
            raise HTTPException(prepared.status, prepared.reason)
        return await context.write([prepared], job, single=True)

    @router.post(
        "/v1/jobs/bulk",
        status_code=200,
        response_model=BulkAccepted,
        responses=ERRORS,
        summary="Enqueue up to 1,000 jobs in one write, with an answer per job",
    )
    async def submit_bulk(bulk: BulkRequest, context: Submitted) -> Any:
        # `bulk` may be a `PlainBulk` (`_body`): its `jobs` are the same jobs, as dicts.
        def prepare_and_write() -> Any:  # all in one thread: see Submissions
            return context.write_blocking(context.prepare(bulk.jobs), bulk)

        # Before any thread is taken: a bulk waiting here holds none of the thread pool.
        await ingest.auditor.room_for(len(bulk.jobs), AUDIT_WAIT)

        return await run_in_threadpool(prepare_and_write)

    return router


def _digest(model: BaseModel) -> str:
    # ensure_ascii: any string, a lone surrogate too, has a text form (refused later, as a job)
    text = json.dumps(model.model_dump(by_alias=True), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Context:
    """One request's submissions: checks, rate, write, answer, audit, history."""

    def __init__(self, ingest: Ingest, client: ApiClient, source: str | None, key: str | None):
        self.ingest, self.client, self.source, self.key = ingest, client, source, key
        self.digest: str | None = None  # of the request, with an Idempotency-Key

    async def prepared(self, job: JobRequest) -> Prepared | Refused:
        """`prepare`d on the event loop (tens of microseconds); in a thread while the app's
        classes or its Sidekiq version are due to be read (those reads wait for the sidecar
        or for Redis, and must not stall the loop)."""
        if self.ingest.catalog.ready and self.ingest.sidekiq.versions.fresh:
            return self.prepare([job])[0]
        return (await run_in_threadpool(self.prepare, [job]))[0]

    def prepare(self, jobs: Sequence[JobRequest | PlainJob]) -> list[Prepared | Refused]:
        try:
            preparation = Preparation(
                self.client, self.ingest.catalog.current(), self.ingest.sidekiq
            )
            out: list[Prepared | Refused] = []
            for job in jobs:
                try:
                    out.append(preparation.prepare(job))
                except Refused as refused:
                    out.append(refused)
                    job_class, queue = class_and_queue(job)
                    self._audit(refused.status, job_class, queue, reason=refused.reason)
            return out
        except CatalogUnavailable as exc:
            raise self.unavailable(str(exc), written="no") from None
        except SidekiqVersionUnknown:
            raise self.unavailable("the app's Sidekiq version is not known yet", "no") from None
        except redis.RedisError:
            raise self.unavailable("Redis is unavailable", written="no") from None

    async def write(
        self, prepared: list[Prepared | Refused], request: BaseModel, single: bool
    ) -> Any:
        """Write the prepared jobs (waiting on the event loop); the answer."""
        write = _Write(self, prepared, request, single)
        try:
            outcome = await self.ingest.submissions.write(*write.args, **write.options)
        except redis.RedisError as exc:
            raise self._not_written(exc, write.jobs) from None
        return self._written(write, outcome)

    def write_blocking(self, prepared: list[Prepared | Refused], request: BaseModel) -> Any:
        """`write` for a bulk, waiting in the calling thread."""
        write = _Write(self, prepared, request, single=False)
        try:
            outcome = self.ingest.submissions.write_blocking(*write.args, **write.options)
        except redis.RedisError as exc:
            raise self._not_written(exc, write.jobs) from None
        return self._written(write, outcome)

    def _not_written(self, exc: redis.RedisError, jobs: list[Prepared]) -> HTTPException:
        if isinstance(exc, Unreachable):  # nothing was sent
            return self.unavailable("Redis is unavailable", written="no")
        jids = [job.jid for job in jobs]
        return self.unavailable("Redis did not confirm the write", "maybe", jids)

    def _written(self, write: "_Write", outcome: Outcome) -> Any:
        if outcome.throttled:
            raise self._throttled(len(write.jobs), outcome.wait)
        if outcome.replayed is not None:
            return self._replay(outcome.replayed)
        self.ingest.record_history(write.jobs)
        events = [self._event(201, job.job_class, job.queue, job.jid) for job in write.jobs]
        self.ingest.auditor.record(events)
        if write.body is None:
            return JSONResponse(write.reply, write.status)
        return Response(write.body, write.status, media_type=JSONResponse.media_type)

    def _throttled(self, cost: int, wait: float) -> HTTPException:
        client = self.client
        if math.isinf(wait):
            reason = f"{cost} jobs at once: over the client's burst of {client.bucket_size}"
            self._audit(429, reason=reason)
            return HTTPException(429, reason, {"Retry-After": "1"})
        self._audit(429, reason=f"over the rate of {client.rate:g} jobs/s")
        return HTTPException(429, "rate limit exceeded", {"Retry-After": str(math.ceil(wait))})

    def _replay(self, previous: str) -> JSONResponse:
        stored = json.loads(previous)
        if stored["request"] != self.digest:
            self._audit(422, reason="Idempotency-Key reused for another request")
            raise HTTPException(422, "Idempotency-Key already used for another request")
        self._audit(stored["status"], reason="replayed: Idempotency-Key seen before")
        return JSONResponse(stored["body"], stored["status"], {"Idempotent-Replayed": "true"})

    def unavailable(self, detail: str, written: str, jids: Sequence[str] = ()) -> HTTPException:
        self._audit(503, reason=f"{detail} (written: {written})")
        body = {"detail": detail, "written": written, "jids": list(jids)}
        return _Unavailable(body)

    def _event(self, status: int, job_class=None, queue=None, jid=None, reason=None):
        return audit.event(
            status,
            client=self.client.name,
            source_ip=self.source,
            job_class=job_class,
            queue=queue,
            jid=jid,
            reason=reason,
        )

    def _audit(self, status: int, job_class=None, queue=None, jid=None, reason=None) -> None:
        self.ingest.auditor.record([self._event(status, job_class, queue, jid, reason)])


class _Write:
    """One request's write: its accepted jobs, its answer (remembered with its Idempotency-Key)
    and the arguments of `Submissions.write`."""

    def __init__(
        self, context: Context, prepared: list[Prepared | Refused], request: BaseModel, single: bool
    ) -> None:
        self.jobs = [p for p in prepared if isinstance(p, Prepared)]
        self.status = 201 if single else 200
        self.reply: dict[str, Any] | None = _accepted(self.jobs[0]) if single else None
        self.body: bytes | None = None if single else _answer_body(prepared)  # `reply`'s text
        stored = ""  # the answer a retry with the same key gets
        if context.key:
            context.digest = _digest(request)
            if self.reply is None:
                self.reply = _answer(prepared)
            stored = json.dumps(
                {"request": context.digest, "status": self.status, "body": self.reply}
            )
        client = context.client
        self.args = (
            [job.submission() for job in self.jobs],
            Rate(client.name, client.rate, client.bucket_size),
        )
        self.options = {
            "idempotency": (client.name, context.key) if context.key else None,
            "reply": stored,
            "ttl": context.ingest.idempotency_ttl,
        }


class _Unavailable(HTTPException):
    """A 503 whose body is the `Unavailable` model (its handler is added by `mount`)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(503, body["detail"])
        self.body = body


def _accepted(job: Prepared) -> dict[str, Any]:
    return {"jid": job.jid, "class": job.job_class, "queue": job.queue, "at": job.at}


def _answer_body(prepared: list[Prepared | Refused]) -> bytes:
    """What `JSONResponse(_answer(prepared))` sends, written per job from its three values
    rather than a dict per job encoded whole (a tenth of a bulk's CPU went to the answer)."""
    queues: dict[str, str] = {}
    parts = []
    accepted = 0
    for p in prepared:
        if isinstance(p, Prepared):
            accepted += 1
            queue = queues.get(p.queue) or queues.setdefault(p.queue, dumps(p.queue))
            parts.append(f'{{"status":201,"jid":"{p.jid}","queue":{queue},"detail":null}}')
        else:
            parts.append(
                f'{{"status":{p.status},"jid":null,"queue":null,"detail":{dumps(p.reason)}}}'
            )
    counts = f'{{"accepted":{accepted},"refused":{len(prepared) - accepted},"jobs":['
    return (counts + ",".join(parts) + "]}").encode("utf-8")


def _answer(prepared: list[Prepared | Refused]) -> dict[str, Any]:
    results = [
        {"status": 201, "jid": p.jid, "queue": p.queue, "detail": None}
        if isinstance(p, Prepared)
        else {"status": p.status, "jid": None, "queue": None, "detail": p.reason}
        for p in prepared
    ]
    accepted = sum(1 for p in prepared if isinstance(p, Prepared))
    return {"accepted": accepted, "refused": len(prepared) - accepted, "jobs": results}
