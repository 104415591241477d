"""The payload text of a job submitted through gokiq-api (`gokiq_ingest.jobs`), byte for byte:
a job given no options of its own is written from its class's template (`_Template`), which
must give exactly the text the general path encodes for the same fields (`normalize`, then
`encode`). tests/test_ingest.py compares both paths with the app's real Ruby client."""

from __future__ import annotations

import json

import pytest

from gokiq_celery.api_clients import ApiClient
from gokiq_celery.client import SidekiqClient
from gokiq_celery.sidekiq.job import dumps
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_ingest.catalog import Catalog, JobClass
from gokiq_ingest.jobs import JobRequest, Preparation, Refused, _sidekiq_item, _Template

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
