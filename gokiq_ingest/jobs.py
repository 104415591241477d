"""A submitted job: the request's shape, its checks against the client and the app's classes,
and the payload written for it (what `Sidekiq::Client.push` would write, built by
`gokiq_celery.client`)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from typing_extensions import TypedDict

from gokiq_celery.api_clients import ApiClient
from gokiq_celery.client import SidekiqClient, new_jid, new_jids, schedule_time
from gokiq_celery.sidekiq.job import MAX_NESTING, InvalidJob, Job, dumps, strict_dumps, timestamp
from gokiq_celery.sidekiq.submissions import Submission

from . import active_job
from .catalog import Catalog, JobClass

CLASS_NAME = r"^(::)?[A-Z][A-Za-z0-9_]*(::[A-Z][A-Za-z0-9_]*)*$"
# No ":" and no space, as in gokiq's queue settings, and no ASCII control character either;
# spelled as a range so that Python's, pydantic's and JSON Schema's regexes agree (their `\s`
# differ, e.g. on U+0085).
QUEUE_NAME = r"^[^\x00-\x20:]+$"
MAX_BULK = 1000
SIDEKIQ_OPTIONS = ("retry", "backtrace", "dead", "tags", "retry_queue")
JID_BATCH = 256  # jids read from the random buffer at once by a request's preparation
Finite = Annotated[float, Field(allow_inf_nan=False)]


class JobRequest(BaseModel):
    """One job to enqueue. `class` must be a job class of the app, `args` its arguments
    (for an ActiveJob class, `kwargs` its keyword arguments). `at` (epoch seconds) or `in`
    (seconds from now) schedules it, as `perform_at` / `perform_in`; the other fields are
    Sidekiq job options, for Sidekiq job classes (an ActiveJob class has its own)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    job_class: str = Field(alias="class", max_length=200, pattern=CLASS_NAME)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] | None = Field(None, description="ActiveJob keyword arguments")
    queue: str | None = Field(None, max_length=200, pattern=QUEUE_NAME)
    at: Finite | None = Field(None, description="epoch seconds")
    in_: Finite | None = Field(None, alias="in", description="seconds from now")
    retry: StrictBool | StrictInt | None = None
    backtrace: StrictBool | StrictInt | None = None
    dead: StrictBool | None = None
    tags: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=50)
    retry_queue: str | None = Field(None, max_length=200, pattern=QUEUE_NAME)

    @model_validator(mode="after")
    def _at_or_in(self) -> JobRequest:
        if self.at is not None and self.in_ is not None:
            raise ValueError("give `at` or `in`, not both")
        return self

    def sidekiq_options(self) -> dict[str, Any]:
        """The Sidekiq options given, in the request's order."""
        given = self.model_fields_set
        return {name: getattr(self, name) for name in SIDEKIQ_OPTIONS if name in given}

    def plain(self) -> bool:
        """No kwargs and no Sidekiq option given (`sidekiq_options()` empty), cheaply."""
        return self.kwargs is None and self.model_fields_set.isdisjoint(SIDEKIQ_OPTIONS)


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BULK)


class PlainJob(TypedDict):
    """A `JobRequest` given only `class`, `args`, `queue`, `at` or `in` (no kwargs, no
    option), with the same constraints, as a dict of the given fields (by field name). A
    pydantic model per job was an eighth of a bulk's CPU (py-spy on bench/ingest.py): a
    bulk of such jobs only, the usual, is validated as these dicts (`plain_bulk`), about five
    times cheaper; any other bulk as `BulkRequest`."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    job_class: Annotated[str, Field(alias="class", max_length=200, pattern=CLASS_NAME)]
    args: NotRequired[list[Any]]
    queue: NotRequired[Annotated[str, Field(max_length=200, pattern=QUEUE_NAME)] | None]
    at: NotRequired[Finite | None]
    in_: NotRequired[Annotated[Finite | None, Field(alias="in")]]


class _PlainBulk(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    jobs: Annotated[list[PlainJob], Field(min_length=1, max_length=MAX_BULK)]


_PLAIN_BULK = TypeAdapter(_PlainBulk)


@dataclass(frozen=True)
class PlainBulk:
    """A bulk body of `PlainJob`s only: what `BulkRequest` would hold, in dicts."""

    jobs: list[PlainJob]


def plain_bulk(raw: bytes) -> PlainBulk | None:
    """The body as `PlainBulk`, or None when it is not one that `BulkRequest` takes as is
    (not JSON, not valid, a job with other fields, or with both `at` and `in`)."""
    try:
        jobs = _PLAIN_BULK.validate_json(raw)["jobs"]
    except ValidationError:
        return None
    if any(job.get("at") is not None and job.get("in_") is not None for job in jobs):
        return None  # `JobRequest` refuses it, and says why
    return PlainBulk(jobs)


def job_request(job: JobRequest | PlainJob) -> JobRequest:
    """The job as its model (a `PlainJob`'s fields validated again, as given)."""
    return job if isinstance(job, JobRequest) else JobRequest.model_validate(job)


def class_and_queue(job: JobRequest | PlainJob) -> tuple[str, str | None]:
    """The class and the queue as submitted (for the audit of a refusal)."""
    return _given(job)[:2]


def _given(job: JobRequest | PlainJob) -> tuple[str, str | None, Any, bool, Any, Any]:
    """What a job request gives, model or dict: class, queue, args (None: a `PlainJob`'s,
    read only if needed), whether it is plain (no kwargs, no option), at, in."""
    if isinstance(job, JobRequest):
        return job.job_class, job.queue, job.args, job.plain(), job.at, job.in_
    return job["job_class"], job.get("queue"), None, True, job.get("at"), job.get("in_")


class Refused(Exception):
    """A submission the API does not enqueue: `status` and a reason for the caller."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Prepared:
    """A job ready to write."""

    jid: str
    job_class: str  # as submitted (for ActiveJob: its class, not the wrapper)
    queue: str
    at: float | None
    job: Job  # the payload, parsed back as any reader of the queue will parse it

    def submission(self) -> Submission:
        return Submission(self.queue, self.job.text, self.at)


class Preparation:
    """The jobs of one request, prepared against one reading of the clock, as Sidekiq's
    `push_bulk` gives all its jobs one `created_at` (and one `enqueued_at`, read when the
    first is encoded).

    Jobs of a Sidekiq class given no options of their own differ only in their args and
    jid, so their payload's text around those two is encoded once per class, queue and kind
    (queued or scheduled) in a request (`_Template`): in a bulk of 1,000, about a third of
    the CPU per job went to normalising and encoding those same fields again (py-spy on
    bench/ingest.py). Each payload is still parsed back as every reader will parse it."""

    def __init__(self, client: ApiClient, catalog: Catalog, sidekiq: SidekiqClient) -> None:
        self.client, self.catalog, self.sidekiq = client, catalog, sidekiq
        self.now = time.time()
        self._templates: dict[tuple[str, str | None, bool], _Template | None] = {}
        self._jids: list[str] = []

    @functools.cached_property
    def enqueued_at(self) -> Any:
        """The one `enqueued_at` of the request's queued jobs, read at the first of them."""
        return timestamp(self.sidekiq.version)

    def prepare(self, request: JobRequest | PlainJob) -> Prepared:
        """The job's payload, or `Refused`: 403 (class or queue not the client's), 422 (not a
        job class of the app, arguments that are not strict JSON), 400 (options that do not
        apply)."""
        client, catalog, sidekiq, now = self.client, self.catalog, self.sidekiq, self.now
        job_class, given_queue, args, plain, at, in_ = _given(request)
        name = job_class.removeprefix("::")
        if not client.may_enqueue(name):
            raise Refused(403, f"class {name} is not allowed for client {client.name}")
        klass = catalog.classes.get(name)
        if klass is None:
            raise Refused(422, f"{name} is not a job class of the app")
        queue = given_queue or klass.queue or str(klass.sidekiq_options.get("queue") or "default")
        if not client.may_use_queue(queue):
            raise Refused(403, f"queue {queue} is not allowed for client {client.name}")
        at = schedule_time(at, in_, now)
        if klass.active_job:
            setter = _adapter_uses_setter(sidekiq, catalog)
            request = job_request(request)
            item, defaults = _active_job_item(request, klass, catalog, queue, now, at, setter)
        elif plain and (template := self._template(klass, given_queue, queue, at is None)):
            jid = self._jid()
            if args is None:
                args = request.get("args", [])  # type: ignore[union-attr]  # a PlainJob
            return Prepared(jid, name, queue, at, template.job(args, jid))
        else:
            item, defaults = _sidekiq_item(job_request(request), klass, queue)
        enqueued_at = self.enqueued_at if at is None else None
        job = _payload(sidekiq, item, defaults, now, enqueued_at)
        return Prepared(job.jid, name, queue, at, job)

    def _jid(self) -> str:
        """A new jid (`new_jid`), read with the next `JID_BATCH` - 1 of the request's."""
        if not self._jids:
            self._jids = new_jids(JID_BATCH)
        return self._jids.pop()

    def _template(
        self, klass: JobClass, given_queue: str | None, queue: str, queued: bool
    ) -> _Template | None:
        """The template for a job given no options of its own (`plain`), from the second
        such job of its kind on (for one job, encoding its fields once costs less than a
        template)."""
        key = (klass.name, given_queue, queued)
        if key not in self._templates:
            self._templates[key] = None
        elif self._templates[key] is None:
            item: dict[str, Any] = {"class": klass.name, "args": []}
            if given_queue is not None:
                item["queue"] = queue
            fields = self.sidekiq.normalize(item, self.now, klass.sidekiq_options)
            written = self.sidekiq.written_fields(
                fields, queued=queued, enqueued_at=self.enqueued_at if queued else None
            )
            self._templates[key] = _Template(written, slots=("args", "jid"))
        return self._templates[key]


class _Template:
    """`dumps(fields)` cut where the `slots` fields go: with their values encoded in between,
    the same text, byte for byte (JSON encodes each member on its own).

    `job` also spares parsing each payload back (`Job.parse`, a quarter of a templated job's
    CPU): the template's own fields are parsed once, with empty args, and what
    `Job.parse` could refuse in a job's args (NaN or an infinite number, a lone surrogate,
    nesting deeper than `MAX_NESTING`) is checked on their text; args that might be any of
    those take the whole parse, which refuses them as before."""

    def __init__(self, fields: Mapping[str, Any], slots: tuple[str, ...]) -> None:
        self.slots: list[str] = []
        self.texts: list[str] = []
        text = "{"
        for n, (key, value) in enumerate(fields.items()):
            text += ("," if n else "") + dumps(key) + ":"
            if key in slots:
                self.texts.append(text)
                self.slots.append(key)
                text = ""
            else:
                text += dumps(value)
        self.texts.append(text + "}")
        self.brackets = sum(t.count("[") + t.count("{") for t in self.texts)
        self.fields: dict[str, Any] | None = None  # parsed; None: each job is parsed whole
        if set(slots) == {"args", "jid"}:
            with contextlib.suppress(InvalidJob):  # a job's whole parse will refuse it
                self.fields = Job.parse(self.text({"args": "[]", "jid": '""'})).fields

    def job(self, args: list[Any], jid: str) -> Job:
        """The payload with `args` and `jid` (hex digits), as `Job.parse` would return it, or
        `Refused` as `_parsed` refuses it."""
        try:
            args_text: str | None = strict_dumps(args)  # NaN or infinite: ValueError
            if not args_text.isascii():
                args_text.encode("utf-8")  # a lone surrogate: UnicodeEncodeError, a ValueError
        except ValueError:
            args_text = None
        if (
            self.fields is None
            or args_text is None
            or args_text.count("[") + args_text.count("{") + self.brackets > MAX_NESTING
        ):
            return _parsed(self.text({"args": dumps(args), "jid": dumps(jid)}))
        text = self.text({"args": args_text, "jid": f'"{jid}"'})
        return Job(text, {**self.fields, "args": args, "jid": jid})

    def text(self, encoded: Mapping[str, str]) -> str:
        """The payload, given each slot's value encoded (`dumps`)."""
        parts = [self.texts[0]]
        for slot, text in zip(self.slots, self.texts[1:], strict=True):
            parts += (encoded[slot], text)
        return "".join(parts)


def _sidekiq_item(request: JobRequest, klass: JobClass, queue: str):
    if request.kwargs is not None:
        raise Refused(400, f"kwargs: {klass.name} is not an ActiveJob class")
    item: dict[str, Any] = {"class": klass.name, "args": request.args}
    if request.queue is not None:
        item["queue"] = queue
    item.update(request.sidekiq_options())
    return item, klass.sidekiq_options


def _adapter_uses_setter(sidekiq: SidekiqClient, catalog: Catalog) -> bool:
    """Whether the app's ActiveJob adapter enqueues with `JobWrapper.set(wrapped:, queue:)`,
    whose payload puts those options before `args` and `class`: Rails' own adapter from 7.1
    on, and the one Sidekiq ships from 7.3 (it replaces Rails' in a Rails app). Before both,
    Rails' adapter calls `Sidekiq::Client.push("class" => JobWrapper, "wrapped" => ...)`."""
    if sidekiq.versions.require().before(7, 3) is False:
        return True
    return active_job.rails_at_least(catalog.rails_version, 7, 1)


def _active_job_item(request, klass: JobClass, catalog: Catalog, queue, now, at, setter: bool):
    options = request.sidekiq_options()
    if options:
        raise Refused(
            400, f"{', '.join(options)}: an ActiveJob class takes its options from its class"
        )
    try:
        arguments = active_job.serialize_arguments(request.args, request.kwargs)
    except active_job.NotSerializable as exc:
        raise Refused(422, f"args: {exc}") from None
    context = catalog.active_job
    data = active_job.serialize_job(
        klass.name,
        arguments,
        queue=queue,
        priority=klass.priority,
        context=context,
        rails_version=catalog.rails_version,
        now=now,
        scheduled_at=at,
    )
    wrapper, args = context["wrapper"], [data]
    if setter:
        item = {"wrapped": klass.name, "queue": queue, "args": args, "class": wrapper}
    else:
        item = {"class": wrapper, "wrapped": klass.name, "queue": queue, "args": args}
    return item, {**context.get("wrapper_options", {}), **klass.sidekiq_options}


def _payload(sidekiq: SidekiqClient, item, defaults, now: float, enqueued_at: Any) -> Job:
    """`enqueued_at`: the request's, for a job put on a queue now; None for a scheduled one."""
    fields = sidekiq.normalize(item, now, defaults)
    fields["jid"] = new_jid()
    queued = enqueued_at is not None
    return _parsed(sidekiq.encode(fields, queued=queued, enqueued_at=enqueued_at))


def _parsed(text: str) -> Job:
    try:
        return Job.parse(text)  # what Sidekiq (Ruby's JSON.parse) could not read is no job
    except InvalidJob as exc:
        raise Refused(422, f"args: not strict JSON ({exc.reason})") from None
