"""The payload value object: exact bytes kept, unknown fields untouched, both timestamp forms."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gokiq_celery.sidekiq.job import (
    _NAME_FIELDS,
    InvalidJob,
    Job,
    dumps,
    epoch_seconds,
    timestamp,
)

# Real Sidekiq 6.4.1 output (docs/sidekiq-protocol.md §1.3 and §8).
SIDEKIQ_PAYLOAD = (
    '{"retry":true,"queue":"default","args":[1,"two",{"three":3}],"class":"HardJob",'
    '"jid":"f480c497440052e0f83cbf1a","created_at":1795415903.1272464,'
    '"enqueued_at":1795415903.1275609}'
)
ACTIVE_JOB_PAYLOAD = (
    '{"retry":true,"queue":"mailers","class":"ActiveJob::QueueAdapters::SidekiqAdapter::'
    'JobWrapper","wrapped":"AjJob","args":[{"job_class":"AjJob","arguments":[]}],'
    '"jid":"955c0000000000000000abcd","created_at":1795415912.5462615}'
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
extra_fields = st.dictionaries(
    # Not the fields Job.parse checks (names must be strings, retry_count an integer).
    st.text(min_size=1).filter(lambda k: k not in {"args", "retry_count", *_NAME_FIELDS}),
    json_values,
    max_size=6,
)


def test_parse_keeps_the_exact_text_and_reads_fields():
    job = Job.parse(SIDEKIQ_PAYLOAD.encode())
    assert job.raw == SIDEKIQ_PAYLOAD.encode()
    assert (job.class_name, job.jid, job.queue, job.retry) == (
        "HardJob",
        "f480c497440052e0f83cbf1a",
        "default",
        True,
    )
    assert job.args == [1, "two", {"three": 3}]
    assert job.display_class == "HardJob" and not job.is_active_job


@pytest.mark.parametrize(
    "wrapper",
    ["ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper", "Sidekiq::ActiveJob::Wrapper"],
)
def test_active_job_shows_the_wrapped_class_for_both_wrapper_names(wrapper):
    job = Job.parse(
        ACTIVE_JOB_PAYLOAD.replace("ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper", wrapper)
    )
    assert job.is_active_job and job.display_class == "AjJob"


def test_display_class_wins_over_wrapped():
    job = Job.build({"class": "X", "args": [], "wrapped": "Y", "display_class": "Z"})
    assert job.display_class == "Z"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (b'{"args":[]}', "no class"),
        (b'{"class":"","args":[]}', "no class"),
        (b'{"class":"A","args":{}}', "args is not an array"),
        (b'{"class":"A"}', "args is not an array"),
        (b'{"class":"A","args":[],"jid":5}', "jid is not a string"),
    ],
)
def test_invalid_payloads_say_why(raw, reason):
    with pytest.raises(InvalidJob) as info:
        Job.parse(raw)
    assert info.value.reason == reason and info.value.raw == raw


def test_replace_changes_only_what_it_names():
    text = '{ "class":"A", "args":[1.0e+20, "\\u00e9"], "x" : 1795415903.1272464,"jid":"j"}'
    job = Job.parse(text).replace({"jid": "k", "retry_count": 0}, remove=("x",))
    assert job.text == '{"class":"A","args":[1.0e+20, "\\u00e9"],"jid":"k","retry_count":0}'


@given(extra=extra_fields)
def test_unknown_fields_and_key_order_survive_a_change(extra):
    fields = {"class": "HardJob", **extra, "args": [1], "jid": "a" * 24}
    original = Job.parse(dumps(fields))
    changed = original.replace({"retry_count": 3})
    decoded = json.loads(changed.text, object_pairs_hook=list)
    assert [k for k, _ in decoded] == [*fields, "retry_count"]
    assert changed.fields == {**fields, "retry_count": 3}
    # every member the change did not name keeps its text exactly
    for key, _ in decoded[:-1]:
        assert _member_text(original.text, key) == _member_text(changed.text, key)


@given(extra=extra_fields)
def test_an_empty_change_is_the_identity(extra):
    job = Job.parse(dumps({"class": "A", "args": [], **extra}))
    assert job.replace({}).text == job.text


def _member_text(text: str, key: str) -> str:
    for key_text, k, value_text in Job.parse(text)._members:
        if k == key:
            return key_text + ":" + value_text
    raise KeyError(key)


def test_timestamps_in_both_forms():
    assert timestamp(7, 1795415903.25) == 1795415903.25
    assert timestamp(8, 1795415903.25) == 1795415903250
    assert epoch_seconds(1795415903.25) == 1795415903.25
    assert epoch_seconds(1795415903250) == 1795415903.25
    assert epoch_seconds(1795415903) == 1795415903.0  # integer seconds from a 6/7 writer
    assert epoch_seconds(None) is None and epoch_seconds(True) is None


def test_dumps_writes_like_ruby():
    assert dumps({"a": "é", "b": [1, 2.5]}) == '{"a":"é","b":[1,2.5]}'


def test_retry_now_s_minus_one_is_a_job_and_anything_below_is_not():
    """Sidekiq's Retry Now (SortedEntry#retry) takes one off a first retry's retry_count 0."""
    assert Job.parse('{"class":"A","args":[],"retry_count":-1}').get("retry_count") == -1
    with pytest.raises(InvalidJob, match="retry_count"):
        Job.parse('{"class":"A","args":[],"retry_count":-2}')
