"""The payload text of a job submitted through gokiq-api (`gokiq_ingest.jobs`), byte for byte:
a job given no options of its own is written from its class's template (`_Template`), which
must give exactly the text the general path encodes for the same fields (`normalize`, then
`encode`). tests/test_ingest.py compares both paths with the app's real Ruby client."""

from __future__ import annotations

import json

import pytest
from fastapi.responses import JSONResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gokiq_celery.api_clients import ApiClient
from gokiq_celery.client import SidekiqClient, new_jids
from gokiq_celery.sidekiq.job import InvalidJob, Job, dumps
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_ingest.catalog import Catalog, JobClass
from gokiq_ingest.jobs import (
    BulkRequest,
    JobRequest,
    Preparation,
    Prepared,
    Refused,
    _sidekiq_item,
    _Template,
    job_request,
    plain_bulk,
)
from gokiq_ingest.router import _answer, _answer_body

CLIENT = ApiClient("c", "token-0123456789abcdef", classes=("*",), queues=("*",))
DEFAULTS = {"retry": True, "queue": "default"}  # in each class's get_sidekiq_options
CATALOG = Catalog(
    {
        "HardJob": JobClass("HardJob", "sidekiq", "default", DEFAULTS),
        "FailJob": JobClass(
            "FailJob", "sidekiq", "critical", {**DEFAULTS, "queue": "critical", "backtrace": 5}
        ),
        "Ns::Uni": JobClass(
            "Ns::Uni", "sidekiq", "low", {**DEFAULTS, "tags": ["ä"], "queue": "low"}
        ),
    }
)
REQUESTS = [
    {"class": "HardJob", "args": [1, "two", {"k": [3.5, None, True]}]},
    {"class": "HardJob", "args": ['ünï \u2028 " \\ \n', 1e300, 2.5e-7, -0.0, 10**30]},
    {"class": "HardJob", "args": [], "queue": "other"},
    {"class": "HardJob", "args": [1], "in": 600},
    {"class": "::FailJob", "args": [[[]], {}]},
    {"class": "Ns::Uni", "args": [None]},
]


@pytest.mark.parametrize("version", [6, 7, 8])
@pytest.mark.parametrize("body", REQUESTS)
def test_a_templated_payload_is_the_encoded_one_byte_for_byte(redis_client, body, version):
    sidekiq = SidekiqClient(SidekiqStore(redis_client), version)
    preparation = Preparation(CLIENT, CATALOG, sidekiq)
    request = JobRequest.model_validate(body)
    for _ in range(2):  # the first is encoded whole, the second comes from the template
        prepared = preparation.prepare(request)
        klass = CATALOG.classes[prepared.job_class]
        item, defaults = _sidekiq_item(request, klass, prepared.queue)
        fields = sidekiq.normalize(item, preparation.now, defaults)
        fields["jid"] = prepared.jid
        enqueued_at = prepared.job.get("enqueued_at")
        expected = sidekiq.encode(fields, queued=prepared.at is None, enqueued_at=enqueued_at)
        assert prepared.job.text == expected


def test_a_template_cuts_the_encoded_text_where_its_slots_go():
    fields = {"a": 1, "args": [], "é": {"x": [1.5, "ü"]}, "jid": "", "z": None}
    template = _Template(fields, slots=("args", "jid"))
    values = {"args": [[1], "\u2028"], "jid": "0123456789abcdef01234567"}
    encoded = {k: dumps(v) for k, v in values.items()}
    assert template.text(encoded) == dumps({**fields, **values})


def test_args_that_are_not_strict_json_are_refused_on_the_template_path_too(redis_client):
    preparation = Preparation(CLIENT, CATALOG, SidekiqClient(SidekiqStore(redis_client), 7))
    for args in ([float("nan")], ["\ud800"], [json.loads("[" * 100 + "]" * 100)]):
        with pytest.raises(Refused) as refused:
            preparation.prepare(JobRequest(job_class="HardJob", args=args))
        assert refused.value.status == 422


# The outer field order each ActiveJob adapter writes, read from real enqueues (ActiveJob
# 7.1.6 and 7.2.3 on Sidekiq 6.4.1 and 7.3.9, by hand: Debian has Rails 6.1, which
# tests/test_ingest.py compares with the app's own perform_later). From Rails 7.1 (and in the
# adapter Sidekiq 7.3+ ships) it is `JobWrapper.set(wrapped:, queue:).perform_async(data)`.
PUSH_ORDER = ["retry", "queue", "class", "wrapped", "args", "jid", "created_at", "enqueued_at"]
SETTER_ORDER = ["retry", "queue", "wrapped", "args", "class", "jid", "created_at", "enqueued_at"]


@pytest.mark.parametrize(
    ("rails", "version", "order"),
    [
        ("6.1.7.10", "6.4.1", PUSH_ORDER),
        ("7.0.8", "7.2.4", PUSH_ORDER),
        ("7.1.6", "6.4.1", SETTER_ORDER),
        ("7.2.3", "7.3.9", SETTER_ORDER),
        ("6.1.7.10", "7.3.9", SETTER_ORDER),
        (None, "6.4.1", PUSH_ORDER),
    ],
)
def test_an_active_job_payload_has_its_adapters_field_order(redis_client, rails, version, order):
    context = {"wrapper": "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper",
               "wrapper_options": DEFAULTS, "locale": "en", "timezone": None}  # fmt: skip
    catalog = Catalog(
        {"GreetJob": JobClass("GreetJob", "active_job", "default", {})}, rails, context
    )
    sidekiq = SidekiqClient(SidekiqStore(redis_client), version)
    preparation = Preparation(CLIENT, catalog, sidekiq)
    prepared = preparation.prepare(JobRequest(job_class="GreetJob", args=[1]))
    assert list(json.loads(prepared.job.text)) == order
    scheduled = preparation.prepare(JobRequest.model_validate({"class": "GreetJob", "in": 60}))
    assert list(json.loads(scheduled.job.text)) == order[:-1]


@pytest.fixture(scope="module")
def unused_store(redis_server) -> SidekiqStore:
    """A store that these tests never read or write (the Sidekiq version is given): one for
    the module, so that its many cases do not each take a test database."""
    return SidekiqStore(redis_server.client(0))


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Args at the edges of what `Job.parse` accepts: a templated job checks them on their own text
# instead of parsing its payload back, and must reach the same verdict.
EDGE_ARGS = [
    [1, "two", {"k": [3.5, None, True]}],
    ['ünï \u2028 \x00 " \\ \n', 10**30, -0.0, 1e300, 2.5e-7],
    [float("nan")],
    [float("inf"), 1],
    ["\ud800"],
    [{"k": "\udfff"}],
    ["[{" * 80],  # brackets in a string: counted, yet not nested
    *([_nested(depth)] for depth in (97, 98, 99, 100)),
    [1, _nested(98)],
]


@pytest.mark.parametrize("version", [7, 8])
@pytest.mark.parametrize("args", EDGE_ARGS, ids=range(len(EDGE_ARGS)))
@pytest.mark.parametrize("cls", ["HardJob", "Ns::Uni"])  # Ns::Uni's template holds a list
def test_a_templated_job_is_what_parsing_its_payload_gives(unused_store, args, version, cls):
    sidekiq = SidekiqClient(unused_store, version)
    preparation = Preparation(CLIENT, CATALOG, sidekiq)
    preparation.prepare(JobRequest(job_class=cls, args=[]))  # the next one is templated
    klass = CATALOG.classes[cls]
    item, defaults = _sidekiq_item(JobRequest(job_class=cls, args=args), klass, klass.queue)
    fields = sidekiq.normalize(item, preparation.now, defaults)
    try:
        prepared = preparation.prepare(JobRequest(job_class=cls, args=args))
    except Refused as refused:
        fields["jid"] = "0" * 24
        text = sidekiq.encode(fields, enqueued_at=preparation.enqueued_at)
        with pytest.raises(InvalidJob) as invalid:
            Job.parse(text)
        assert (refused.status, refused.reason) == (
            422,
            f"args: not strict JSON ({invalid.value.reason})",
        )
        return
    fields["jid"] = prepared.jid
    text = sidekiq.encode(fields, enqueued_at=preparation.enqueued_at)
    assert prepared.job.text == text
    parsed = Job.parse(text).fields
    assert list(prepared.job.fields.items()) == list(parsed.items())
    assert json.dumps(prepared.job.fields) == json.dumps(parsed)  # -0.0, types and all


def test_a_plain_job_as_a_dict_is_prepared_as_its_model(unused_store):
    sidekiq = SidekiqClient(unused_store, 7)
    jobs = [{"class": "HardJob", "args": [n]} for n in range(3)]
    jobs.append({"class": "::FailJob", "queue": "low", "in": 600})
    bulk = plain_bulk(json.dumps({"jobs": jobs}).encode())
    assert bulk is not None
    by_dict, by_model = Preparation(CLIENT, CATALOG, sidekiq), Preparation(CLIENT, CATALOG, sidekiq)
    by_model.now = by_dict.now
    by_model.__dict__["enqueued_at"] = by_dict.enqueued_at  # one reading of the clock
    for job in bulk.jobs:
        ours, theirs = by_dict.prepare(job), by_model.prepare(JobRequest.model_validate(job))
        assert (ours.job_class, ours.queue, ours.at) == (theirs.job_class, theirs.queue, theirs.at)
        assert ours.job.text.replace(ours.jid, "") == theirs.job.text.replace(theirs.jid, "")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD_VALUES = {
    "class": st.sampled_from(["HardJob", "::Ns::Uni", "hard job", "A" * 201, ""]) | JSON_VALUES,
    "args": st.lists(JSON_VALUES, max_size=3) | JSON_VALUES,
    "queue": st.sampled_from(["low", "a:b", "q\x85", None]) | JSON_VALUES,
    "at": st.floats() | st.integers() | st.none() | JSON_VALUES,
    "in": st.floats() | st.integers() | st.none() | JSON_VALUES,
    "retry": st.just(3),
    "kwargs": st.just({}),
    "job_class": st.just("HardJob"),
    "oops": st.just(1),
}


@settings(max_examples=300, deadline=None)
@given(
    jobs=st.lists(
        st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.none()).flatmap(
            lambda keys: st.fixed_dictionaries({k: FIELD_VALUES[k] for k in keys})
        ),
        max_size=3,
    )
)
def test_a_plain_bulk_is_what_the_bulk_model_holds(jobs):
    """`plain_bulk` takes a body only if `BulkRequest` takes it, and gives the same jobs."""
    raw = json.dumps({"jobs": jobs}).encode()
    plain = plain_bulk(raw)
    try:
        model = BulkRequest.model_validate(json.loads(raw))
    except ValidationError:
        assert plain is None
        return
    if plain is None:  # a bulk with other fields, or `at` and `in` both null
        assert any(job.keys() - {"class", "args", "queue", "at", "in"} for job in jobs) or any(
            "at" in job and "in" in job for job in jobs
        )
        return
    assert [job_request(job) for job in plain.jobs] == model.jobs
    assert [job_request(job).model_fields_set for job in plain.jobs] == [
        job.model_fields_set for job in model.jobs
    ]


def test_a_plain_bulk_with_at_and_in_is_left_to_the_model_which_refuses_it():
    both = {"class": "HardJob", "at": 2e9, "in": 600}
    assert plain_bulk(json.dumps({"jobs": [{"class": "HardJob"}, both]}).encode()) is None
    one = plain_bulk(json.dumps({"jobs": [{**both, "at": None}]}).encode())
    assert one is not None and one.jobs == [{"job_class": "HardJob", "at": None, "in_": 600.0}]


def test_a_bulk_answer_is_what_its_json_response_sends():
    prepared = [
        Prepared("a" * 24, "HardJob", "default", None, Job.build({"class": "HardJob", "args": []})),
        Refused(403, 'queue "ü\u2028" is not allowed'),
        Prepared(
            "b" * 24, "FailJob", 'ünï \u2028 "q\\\\', 2e9, Job.build({"class": "X", "args": []})
        ),
        Refused(422, "Ns::NoSuchJob is not a job class of the app"),
    ]
    assert _answer_body(prepared) == JSONResponse(_answer(prepared)).body
    assert _answer_body(prepared[:1]) == JSONResponse(_answer(prepared[:1])).body


def test_new_jids_are_each_a_new_jid():
    jids = new_jids(5000)  # a buffer's refill in between
    assert len(set(jids)) == 5000
    assert all(len(jid) == 24 and int(jid, 16) >= 0 for jid in jids)
