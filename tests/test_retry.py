"""RetryPolicy: every `retry` value, the delay curve, error fields, backtrace encoding."""

from __future__ import annotations

import base64
import json
import random
import zlib

import pytest

from gokiq_celery.sidekiq import Failure, Job, Outcome, RetryPolicy
from gokiq_celery.sidekiq.retry import decode_backtrace, encode_backtrace

NOW = 1795415930.8421504
BOOM = Failure("ArgumentError", "boom", ("a.rb:1", "b.rb:2", "c.rb:3"))


def job(**fields) -> Job:
    return Job.build(
        {
            "class": "FailJob",
            "args": [1],
            "jid": "1f07" * 6,
            "queue": "default",
            "retry": True,
            "created_at": NOW - 10,
            **fields,
        }
    )


class Fixed(random.Random):
    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def randrange(self, *args, **kwargs) -> int:
        return self.value


@pytest.mark.parametrize(
    ("retry", "outcome", "limit"),
    [
        (True, Outcome.RETRY, 25),
        (3, Outcome.RETRY, 3),
        ("5", Outcome.RETRY, 25),
        (5.0, Outcome.RETRY, 25),
        (0, Outcome.DEAD, 0),
        (False, Outcome.DROPPED, 0),
        (None, Outcome.DROPPED, 0),
    ],
)
def test_retry_values_resolve_as_sidekiq(retry, outcome, limit):
    decision = RetryPolicy().decide(job(retry=retry), BOOM, "default", NOW)
    assert decision.outcome is outcome
    if outcome is not Outcome.DROPPED:
        assert decision.limit == limit


def test_missing_retry_takes_the_class_option_from_the_sidecar():
    no_retry = job().replace({}, remove=("retry",))
    failure = Failure("E", "m", class_retry=2)
    assert RetryPolicy().decide(no_retry, failure, "default", NOW).limit == 2
    unknown_class = Failure("NameError", "m")
    assert RetryPolicy().decide(no_retry, unknown_class, "q", NOW).outcome is Outcome.DROPPED


def test_retry_n_runs_n_plus_one_times_then_dies_with_count_n():
    policy, current, outcomes = RetryPolicy(), job(retry=3), []
    for _ in range(4):
        decision = policy.decide(current, BOOM, "default", NOW)
        outcomes.append((decision.outcome, decision.job.get("retry_count")))
        current = decision.job
    assert outcomes == [
        (Outcome.RETRY, 0),
        (Outcome.RETRY, 1),
        (Outcome.RETRY, 2),
        (Outcome.DEAD, 3),
    ]


def test_error_fields_first_and_later_failures():
    first = RetryPolicy().decide(job(retry=True), BOOM, "default", NOW).job
    assert first.get("retry_count") == 0 and first.get("failed_at") == NOW
    assert "retried_at" not in first and "error_backtrace" not in first
    second = RetryPolicy().decide(first, Failure("KeyError", "x" * 20_000), "default", NOW + 20).job
    assert second.get("retry_count") == 1 and second.get("retried_at") == NOW + 20
    assert second.get("failed_at") == NOW and second.get("error_class") == "KeyError"
    assert len(second.get("error_message")) == 10_000


def test_sidekiq_8_writes_integer_milliseconds():
    first = RetryPolicy(sidekiq_version=8).decide(job(), BOOM, "default", NOW).job
    assert first.get("failed_at") == int(NOW * 1000)


def test_retry_queue_is_where_the_retry_goes():
    decision = RetryPolicy().decide(job(retry_queue="low"), BOOM, "default", NOW)
    assert decision.job.queue == "low"
    assert RetryPolicy().decide(job(queue="x"), BOOM, "popped", NOW).job.queue == "popped"


@pytest.mark.parametrize(
    ("count", "base"),
    [(0, 15), (1, 16), (2, 31), (3, 96), (4, 271), (5, 640), (10, 10015), (24, 331791)],
)
def test_delay_curve_without_jitter(count, base):
    assert RetryPolicy(rng=Fixed(0)).delay(count) == base


def test_jitter_by_version():
    assert RetryPolicy(rng=Fixed(9)).delay(2) == 31 + 9 * 3  # 6/7: rand(10) * (count+1)
    assert RetryPolicy(sidekiq_version=8, rng=Fixed(29)).delay(2) == 31 + 29  # 8: [0, 10(c+1))
    delays = {RetryPolicy().delay(0) for _ in range(500)}
    assert delays == set(range(15, 25))


def test_custom_delay_wins_and_gets_jitter():
    policy = RetryPolicy(rng=Fixed(0))
    decision = policy.decide(job(), Failure("E", "m", retry_in=100), "default", NOW)
    assert decision.delay == 100
    assert policy.delay(0, 1000.9) == 1000
    assert policy.delay(0, 0) == 15 and policy.delay(0, -5) == 15


def test_retry_in_kill_and_discard():
    kill = RetryPolicy().decide(job(), Failure("E", "m", retry_in="kill"), "default", NOW)
    assert kill.outcome is Outcome.DEAD and kill.goes_to_dead_set
    discard = RetryPolicy().decide(job(), Failure("E", "m", retry_in="discard"), "q", NOW)
    assert discard.outcome is Outcome.DISCARDED and not discard.goes_to_dead_set
    v8 = RetryPolicy(sidekiq_version=8).decide(
        job(), Failure("E", "m", retry_in="discard"), "q", NOW
    )
    assert v8.job.get("discarded_at") == int(NOW * 1000)


@pytest.mark.parametrize(
    ("version", "discarded_at", "death_handlers"),
    [
        ("7.3.9", False, False),
        ("8.0.6", False, False),
        ("8.0.7", False, True),
        ("8.0.8", True, True),
        ("8.1.7", True, True),
        ("8", True, True),
    ],
)
def test_a_retry_in_discard_follows_the_apps_8x_release(version, discarded_at, death_handlers):
    """Sidekiq 8.0.7 added the death handlers for a `sidekiq_retry_in` :discard, 8.0.8 the
    `discarded_at` stamp; a bare major is its newest release."""
    failure = Failure("E", "m", retry_in="discard")
    decision = RetryPolicy(sidekiq_version=version).decide(job(), failure, "q", NOW)
    assert decision.outcome is Outcome.DISCARDED
    assert ("discarded_at" in decision.job) is discarded_at
    assert decision.death_handlers is death_handlers


@pytest.mark.parametrize(
    ("version", "stamped"), [("7.3.9", False), ("8.0.7", False), ("8.0.8", True)]
)
def test_an_unburied_job_is_stamped_discarded_from_8_0_8(version, stamped):
    unburied = RetryPolicy(sidekiq_version=version).unburied(job(), NOW)
    assert unburied.get("discarded_at") == (int(NOW * 1000) if stamped else None)


def test_retry_false_runs_the_death_handlers_on_every_version():
    for version in ("6.4.1", "7", "8.0.0"):
        decision = RetryPolicy(sidekiq_version=version).decide(job(retry=False), BOOM, "q", NOW)
        assert (decision.outcome, decision.death_handlers) == (Outcome.DROPPED, True)


def test_dead_false_is_never_buried():
    decision = RetryPolicy().decide(job(retry=0, dead=False), BOOM, "default", NOW)
    assert decision.outcome is Outcome.DEAD and not decision.goes_to_dead_set


def test_retry_for_window_starts_at_first_failure():
    first = RetryPolicy().decide(job(retry_for=60), BOOM, "default", NOW).job
    inside = RetryPolicy().decide(first, BOOM, "default", NOW + 59)
    outside = RetryPolicy().decide(first, BOOM, "default", NOW + 61)
    assert inside.outcome is Outcome.RETRY and outside.outcome is Outcome.DEAD
    # 8.1: with retry_for the count no longer applies
    many = job(retry_for=3600, retry=1, retry_count=5, failed_at=NOW)
    assert RetryPolicy(sidekiq_version=8).decide(many, BOOM, "q", NOW).outcome is Outcome.RETRY
    assert RetryPolicy(sidekiq_version=7).decide(many, BOOM, "q", NOW).outcome is Outcome.DEAD
    # 8.0.x still counted the retries beside the window
    assert (
        RetryPolicy(sidekiq_version="8.0.10").decide(many, BOOM, "q", NOW).outcome is Outcome.DEAD
    )
    assert (
        RetryPolicy(sidekiq_version="8.1.0").decide(many, BOOM, "q", NOW).outcome is Outcome.RETRY
    )


@pytest.mark.parametrize(("option", "lines"), [(True, 3), (2, 2), (False, None), (None, None)])
def test_backtrace_option(option, lines):
    fields = {} if option is None else {"backtrace": option}
    result = RetryPolicy().decide(job(**fields), BOOM, "default", NOW).job
    if lines is None:
        assert "error_backtrace" not in result
    else:
        assert decode_backtrace(result.get("error_backtrace")) == list(BOOM.backtrace[:lines])


def test_backtrace_is_strict_base64_of_zlib_json_readable_by_the_reference_reader():
    encoded = encode_backtrace(["x.rb:1:in `perform'", "ü"])
    assert "\n" not in encoded
    raw = zlib.decompress(base64.b64decode(encoded, validate=True))
    assert raw[:0] == b"" and base64.b64decode(encoded)[:2] == b"\x78\x9c"
    assert json.loads(raw) == ["x.rb:1:in `perform'", "ü"]
    # and the MIME form Sidekiq <= 7.2.0 writes is read too
    mime = base64.encodebytes(zlib.compress(b'["a","b"]')).decode()
    assert decode_backtrace(mime) == ["a", "b"]
