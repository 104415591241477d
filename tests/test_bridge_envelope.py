"""The bridge's fast Redis envelopes are, to the byte, what kombu's own publish path writes
(bridge/envelope.py): checked for arbitrary jobs, queue names and tokens against a real kombu
Redis channel."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection
from kombu.utils import json as kombu_json

from bridge.envelope import EnvelopeTemplate, TaskMessages
from gokiq_celery.sidekiq.job import Job, dumps

finite = st.floats(allow_nan=False, allow_infinity=False)  # Ruby writes no NaN or Infinity
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
names = st.text(min_size=1, max_size=30)
jobs = st.fixed_dictionaries(
    {"class": names, "args": st.lists(json_values, max_size=4)},
    optional={
        "jid": st.text(alphabet=string.hexdigits, min_size=0, max_size=24),
        "retry_count": st.integers(min_value=0, max_value=30),
        "wrapped": names,
        "display_class": names,
        "queue": names,
        "unknown": json_values,
    },
)


@pytest.fixture
def channel(broker_url):
    with Connection(broker_url) as connection:
        yield connection.default_channel


def slow_envelope(messages: TaskMessages, channel, job: Job, token, queue, celery_queue, tag):
    envelope = messages.kombu_envelope(channel, job, token, queue, celery_queue)
    envelope["properties"]["delivery_tag"] = tag
    if not job.jid:  # a job without a jid gets a random task id on either path
        envelope["headers"]["id"] = envelope["headers"]["root_id"] = "*"
        envelope["properties"]["correlation_id"] = "*"
    return kombu_json.dumps(envelope)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fields=jobs, token=st.text(max_size=30), queue=names, celery_queue=names)
def test_the_template_writes_exactly_what_kombu_writes(channel, fields, token, queue, celery_queue):
    messages = TaskMessages()
    job = Job.parse(dumps(fields))
    fast = messages.redis_envelope(channel, job, token, queue, celery_queue)
    assert messages._templates[(queue, celery_queue)] is not None  # the fast path was taken
    parsed = json.loads(fast)
    tag = parsed["properties"]["delivery_tag"]
    if not job.jid:
        parsed["headers"]["id"] = parsed["headers"]["root_id"] = "*"
        parsed["properties"]["correlation_id"] = "*"
        fast = kombu_json.dumps(parsed)
    assert fast == slow_envelope(messages, channel, job, token, queue, celery_queue, tag)


def test_every_message_gets_its_own_delivery_tag(channel):
    messages = TaskMessages()
    job = Job.build({"class": "HardJob", "args": [1], "jid": "a" * 24})
    tags = {
        json.loads(messages.redis_envelope(channel, job, "t", "q", "q"))["properties"][
            "delivery_tag"
        ]
        for _ in range(100)
    }
    assert len(tags) == 100


def test_a_message_shape_the_template_cannot_reproduce_falls_back_to_kombu(channel, caplog):
    messages = TaskMessages()
    real = messages.task_message

    def with_a_header_of_the_jobs_own(job, queue, token, **kw):
        message = real(job, queue, token, **kw)
        message.headers["payload_length"] = len(job.text)  # per job, not a template slot
        return message

    messages.task_message = with_a_header_of_the_jobs_own
    job = Job.build({"class": "HardJob", "args": [1], "jid": "a" * 24})
    envelope = json.loads(messages.redis_envelope(channel, job, "t", "q", "q"))
    assert messages._templates[("q", "q")] is None
    assert envelope["headers"]["payload_length"] == len(job.text)
    assert "unexpected message shape" in caplog.text


def test_template_slots_are_found_wherever_the_sentinels_stand():
    template = EnvelopeTemplate('{"a": "\\u0000gokiq:x\\u0000", "n": 7102938475, "b": "{}"}')
    assert template.fill({"x": '"X"', "retries": "3"}) == '{"a": "X", "n": 3, "b": "{}"}'
