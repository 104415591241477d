"""A submitted job: the request's shape, its checks against the client and the app's classes,
and the payload written for it (what `Sidekiq::Client.push` would write, built by
`gokiq_celery.client`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from gokiq_celery.api_clients import ApiClient
from gokiq_celery.client import SidekiqClient, new_jid, schedule_time
from gokiq_celery.sidekiq.job import InvalidJob, Job, dumps, timestamp
from gokiq_celery.sidekiq.submissions import Submission

from . import active_job
from .catalog import Catalog, JobClass

CLASS_NAME = r"^(::)?[A-Z][A-Za-z0-9_]*(::[A-Z][A-Za-z0-9_]*)*$"
# No ":" and no space, as in gokiq's queue settings, and no ASCII control character either;
# spelled as a range so that Python's, pydantic's and JSON Schema's regexes agree (their `\s`
# differ, e.g. on U+0085).
QUEUE_NAME = r"^[^\x00-\x20:]+$"
MAX_BULK = 1000
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
        names = ("retry", "backtrace", "dead", "tags", "retry_queue")
        given = self.model_fields_set
        return {name: getattr(self, name) for name in names if name in given}


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BULK)


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

    @functools.cached_property
    def enqueued_at(self) -> Any:
        """The one `enqueued_at` of the request's queued jobs, read at the first of them."""
        return timestamp(self.sidekiq.version)

    def prepare(self, request: JobRequest) -> Prepared:
        """The job's payload, or `Refused`: 403 (class or queue not the client's), 422 (not a
        job class of the app, arguments that are not strict JSON), 400 (options that do not
        apply)."""
        client, catalog, sidekiq, now = self.client, self.catalog, self.sidekiq, self.now
        name = request.job_class.removeprefix("::")
        if not client.may_enqueue(name):
            raise Refused(403, f"class {name} is not allowed for client {client.name}")
        klass = catalog.classes.get(name)
        if klass is None:
            raise Refused(422, f"{name} is not a job class of the app")
        queue = request.queue or klass.queue or str(klass.sidekiq_options.get("queue") or "default")
        if not client.may_use_queue(queue):
            raise Refused(403, f"queue {queue} is not allowed for client {client.name}")
        at = schedule_time(request.at, request.in_, now)
        if klass.active_job:
            setter = _adapter_uses_setter(sidekiq, catalog)
            item, defaults = _active_job_item(request, klass, catalog, queue, now, at, setter)
        elif template := self._template(request, klass, queue, queued=at is None):
            jid = new_jid()
            job = _parsed(template.text({"args": dumps(request.args), "jid": dumps(jid)}))
            return Prepared(jid, name, queue, at, job)
        else:
            item, defaults = _sidekiq_item(request, klass, queue)
        enqueued_at = self.enqueued_at if at is None else None
        job = _payload(sidekiq, item, defaults, now, enqueued_at)
        return Prepared(job.jid, name, queue, at, job)

    def _template(
        self, request: JobRequest, klass: JobClass, queue: str, queued: bool
    ) -> _Template | None:
        """The template for a job given no options of its own, from the second such job of
        its kind on (for one job, encoding its fields once costs less than a template)."""
        if request.kwargs is not None or request.sidekiq_options():
            return None
        key = (klass.name, request.queue, queued)
        if key not in self._templates:
            self._templates[key] = None
        elif self._templates[key] is None:
            item: dict[str, Any] = {"class": klass.name, "args": []}
            if request.queue is not None:
                item["queue"] = queue
            fields = self.sidekiq.normalize(item, self.now, klass.sidekiq_options)
            written = self.sidekiq.written_fields(
                fields, queued=queued, enqueued_at=self.enqueued_at if queued else None
            )
            self._templates[key] = _Template(written, slots=("args", "jid"))
        return self._templates[key]


class _Template:
    """`dumps(fields)` cut where the `slots` fields go: with their values encoded in between,
    the same text, byte for byte (JSON encodes each member on its own)."""

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
