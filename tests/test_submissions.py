"""gokiq-api's one round trip per submission (`gokiq_celery/sidekiq/submissions.py`,
`lua/submit.lua`) on a real redis-server: the rate limit, the Idempotency-Key and the write
in one step, and what the caller can tell when Redis fails (nothing sent, or no answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
import redis

from gokiq_celery.sidekiq.redis_client import connect_fail_fast, connect_fail_fast_async
from gokiq_celery.sidekiq.submissions import (
    Outcome,
    Rate,
    Submission,
    Submissions,
    Unreachable,
)

from .conftest import free_port

WIDE = Rate("c", rate=1000.0, burst=1000)


Write = Callable[..., Outcome]


def writer(redis_url: str, way: str) -> Write:
    """`Submissions.write` (each call on an event loop and a client of its own) or
    `Submissions.write_blocking`."""

    def write(jobs: Sequence[Submission], rate: Rate, **kwargs) -> Outcome:
        async def run() -> Outcome:
            submissions = Submissions(client, connect_fail_fast_async(redis_url))
            try:
                return await submissions.write(jobs, rate, **kwargs)
            finally:
                await submissions.close()

        client = connect_fail_fast(redis_url)
        if way == "blocking":
            return Submissions(client, connect_fail_fast_async(redis_url)).write_blocking(
                jobs, rate, **kwargs
            )
        return asyncio.run(run())

    return write


@pytest.fixture(params=["event loop", "blocking"])
def submissions(request, redis_url) -> Write:
    return writer(redis_url, request.param)


def test_jobs_are_written_as_a_push_writes_them(submissions, redis_client):
    jobs = [Submission("default", '{"n":1}'), Submission("low", '{"n":2}', at=2e9)]
    assert not submissions(jobs, WIDE).throttled
    assert redis_client.lrange("queue:default", 0, -1) == [b'{"n":1}']
    assert redis_client.smembers("queues") == {b"default"}
    assert redis_client.zrange("schedule", 0, -1, withscores=True) == [(b'{"n":2}', 2e9)]


def test_over_the_rate_writes_nothing_and_says_when(submissions, redis_client):
    narrow = Rate("narrow", rate=0.5, burst=2)
    assert not submissions([Submission("default", "1")] * 2, narrow).throttled
    outcome = submissions([Submission("default", "2")], narrow)
    assert outcome.throttled and 0 < outcome.wait <= 2
    over_burst = submissions([Submission("default", "3")] * 3, Rate("other", 1.0, 2))
    assert over_burst.wait == float("inf")
    assert redis_client.llen("queue:default") == 2


def test_a_known_idempotency_key_replays_and_writes_nothing(submissions, redis_client):
    key = ("c", "order-1")
    job = [Submission("default", "1")]
    first = submissions(job, WIDE, idempotency=key, reply="r1", ttl=60)
    again = submissions(job, WIDE, idempotency=key, reply="r2", ttl=60)
    assert first.replayed is None and again.replayed == "r1"
    assert redis_client.llen("queue:default") == 1


def test_the_script_is_loaded_again_after_redis_forgot_it(submissions, redis_client):
    submissions([Submission("default", "1")], WIDE)
    redis_client.script_flush()
    submissions([Submission("default", "2")], WIDE)
    assert redis_client.llen("queue:default") == 2


@pytest.mark.parametrize("way", ["event loop", "blocking"])
def test_no_redis_is_unreachable_nothing_sent(way):
    dead = writer(f"redis://127.0.0.1:{free_port()}/0", way)
    with pytest.raises(Unreachable):
        dead([Submission("default", "1")], WIDE)


def test_a_command_sent_but_not_answered_is_not_unreachable(submissions, redis_client):
    """Redis paused past the client's timeout: the write was sent, so the caller must say
    "maybe" (Redis could have run it and its answer been lost)."""
    redis_client.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    try:
        with pytest.raises(redis.RedisError) as raised:
            submissions([Submission("default", "late")], WIDE)
        assert not isinstance(raised.value, Unreachable)
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
