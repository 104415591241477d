"""Fuzzing what the bridge and the worker parse: payload bytes, the sidecar's replies, settings.

Whatever the input, parsing either succeeds or fails in its one documented way (`InvalidJob`,
`ConfigError`); and what parsing accepts, everything after it can handle: the bridge's message,
the scheduler's move, Sidekiq's retry decision and the payload it writes back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.envelope import TaskMessages
from bridge.fetch import Batch
from bridge.metrics import BridgeMetrics
from bridge.scheduler import Scheduler
from gokiq_celery.connection import Reply
from gokiq_celery.messages import argsrepr, celery_retries
from gokiq_celery.settings import _ENV_NAMES, ConfigError, Settings, load_settings
from gokiq_celery.sidecar import parse_execution
from gokiq_celery.sidekiq.job import InvalidJob, Job, poison_entry
from gokiq_celery.sidekiq.keys import queue_key
from gokiq_celery.sidekiq.retry import RetryPolicy

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

# -- payloads ----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # NaN and infinities included: json.dumps writes them as NaN / Infinity
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "\udfff", "é", "", "default", "abc", "1e400"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
KNOWN = [
    "class", "args", "jid", "queue", "retry", "retry_count", "retry_queue", "wrapped",
    "display_class", "retry_for", "failed_at", "backtrace", "dead", "enqueued_at", "created_at",
]  # fmt: skip
job_fields = st.fixed_dictionaries(
    {
        "class": st.sampled_from(
            ["HardJob", "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper"]
        )
        | values,
        "args": st.lists(values, max_size=3) | values,
    },
    optional={key: values for key in KNOWN[2:]},
)


def _text(fields: dict, ascii_only: bool = True) -> str:
    return json.dumps(fields, ensure_ascii=ascii_only, allow_nan=True)


def _nested(depth: int) -> bytes:
    return b'{"class":"HardJob","args":' + b"[" * depth + b"]" * depth + b"}"


payloads = st.one_of(
    st.binary(max_size=200),
    job_fields.map(_text).map(str.encode),  # lone surrogates as "\\ud800" escapes
    job_fields.map(lambda f: _text(f, False).encode("utf-8", "surrogatepass")),  # as raw bytes
    job_fields.map(lambda f: _text(f, False).encode("utf-8", "backslashreplace")),
    (st.sampled_from([99, 100, 101, 999, 1000, 5000, 100_000]) | st.integers(90, 1200)).map(
        _nested
    ),
    st.tuples(job_fields, st.sampled_from(["NaN", "-Infinity", "1e400", '"\\ud800"', "[]"])).map(
        lambda t: (_text(t[0])[:-1] + ',"retry_count":' + t[1] + "}").encode("utf-8", "replace")
    ),
)

# -- sidecar replies ---------------------------------------------------------------------------

REPLY_KEYS = ["status", "execution_time", "error_class", "error_message", "backtrace"]
REPLY_KEYS += ["retry_in", "class_retry", "discard"]
reply_bodies = st.one_of(
    st.binary(max_size=100),
    st.dictionaries(
        st.sampled_from(REPLY_KEYS),
        values | st.sampled_from(["kill", "discard", "ok", "failed"]),
        max_size=8,
    ).map(lambda d: json.dumps(d, allow_nan=True).encode("utf-8", "surrogatepass")),
    st.sampled_from([b'{"retry_in": 1e400}', b'{"backtrace": "abc"}', b"[" * 5000]),
)
replies = st.builds(
    Reply,
    status=st.sampled_from([200, 400, 409, 413, 422, 500, 502, 418]),
    reason=st.text(max_size=10),
    body=reply_bodies,
)


def _parse(raw: bytes) -> Job | None:
    try:
        return Job.parse(raw)
    except InvalidJob:
        return None


@FUZZ
@given(payloads)
def test_job_parse_accepts_or_refuses_and_what_it_accepts_can_be_written_back(raw):
    job = _parse(raw)
    assert isinstance(poison_entry(raw, "fuzz"), bytes)
    if job is None:
        return
    assert job.raw.decode("utf-8") == job.text  # writable to Redis and to a Celery message
    job.log_context()
    argsrepr(job, job.queue)
    assert isinstance(celery_retries(job), int)
    assert job.replace({"enqueued_at": 1.5}).get("enqueued_at") == 1.5


@FUZZ
@given(payloads, replies, st.sampled_from([6, 7, 8]))
def test_retry_policy_decides_every_accepted_payload_and_any_reply(raw, reply, version):
    job = _parse(raw)
    execution = parse_execution(reply)
    assert isinstance(execution.execution_time, float) and math.isfinite(execution.execution_time)
    if job is None or execution.failure is None:
        return
    decision = RetryPolicy(25, version).decide(job, execution.failure, job.queue)
    decision.job.raw.decode("utf-8")
    assert math.isfinite(decision.delay) and decision.delay >= 0
    assert isinstance(decision.limit, int)


@FUZZ
@given(replies)
def test_sidecar_replies_parse_into_a_usable_execution(reply):
    execution = parse_execution(reply)
    assert isinstance(execution.status, str) and execution.status
    if execution.failure is not None:
        failure = execution.failure
        for text in (failure.error_class, failure.error_message, *failure.backtrace):
            text.encode("utf-8")
        assert failure.retry_in in (None, "kill", "discard") or failure.retry_in > 0


_messages = TaskMessages()


@FUZZ
@given(st.lists(payloads, max_size=5))
def test_the_bridges_batch_and_messages_take_any_payloads(raws):
    batch = Batch("default", raws)
    assert len(batch.jobs) + len(batch.poison) == len(raws)
    for job, token in zip(batch.jobs, batch.tokens, strict=True):
        message = _messages.task_message(job, "default", token)
        json.dumps(message.body)  # the JSON serializer Celery uses takes it


class _RecordingSets:
    """Just enough of ScheduledSets for Scheduler._enqueue; the real one: test_bridge_scheduler."""

    def __init__(self) -> None:
        self.moved, self.buried = [], []

    def enqueue_moved(self, set_name, bridge_id, moves) -> None:
        for queue, payload, _ in moves:
            queue_key(queue).encode()  # a Redis key
            payload.encode()
        self.moved.extend(moves)

    def bury_moved(self, set_name, bridge_id, raw, entry=b"") -> None:
        self.buried.append(raw)


@FUZZ
@given(st.lists(payloads, max_size=5))
def test_the_scheduler_moves_or_buries_every_member(raws):
    sets = _RecordingSets()
    Scheduler(SimpleNamespace(scheduled=sets), "fuzz", BridgeMetrics())._enqueue("retry", raws, 7)
    assert len(sets.moved) + len(sets.buried) == len(raws)


# -- settings ----------------------------------------------------------------------------------

setting_names = st.sampled_from([f.name for f in dataclasses.fields(Settings)])
setting_values = values | st.sampled_from(["nan", "inf", "-1", "1e400", "0", "1e9", " ", "a,b"])


@FUZZ
@given(st.dictionaries(setting_names, st.text(max_size=20), max_size=4))
def test_settings_from_the_environment_load_or_raise_config_error(env):
    environ = {_ENV_NAMES.get(k, f"GOKIQ_{k.upper()}"): v for k, v in env.items()}
    _load_or_config_error(lambda: load_settings(environ=environ))


@FUZZ
@given(st.dictionaries(setting_names, setting_values, max_size=4))
def test_settings_of_any_type_load_or_raise_config_error(overrides):
    _load_or_config_error(lambda: load_settings(environ={}, **overrides))


def _load_or_config_error(load) -> None:
    try:
        loaded = load()
    except ConfigError:
        return
    assert isinstance(loaded, Settings)
    for f in dataclasses.fields(Settings):
        if f.type == "float":
            assert math.isfinite(getattr(loaded, f.name)), f.name
