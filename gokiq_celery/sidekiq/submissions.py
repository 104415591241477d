"""Jobs submitted through gokiq-api, in one round trip to Redis (`lua/submit.lua`): the
client's rate limit (a token bucket per client, shared by every API process), then, for a
request with an `Idempotency-Key`, the reply remembered in the same atomic step, then the jobs
written as Sidekiq's client writes them (SADD `queues` + LPUSH `queue:<q>`, or ZADD
`schedule` for a time in the future). A request over the rate writes nothing; a retried
request gets the first reply back and writes nothing.

The bucket refills at `rate` tokens per second up to `burst`; a submission of n jobs takes n
tokens. The caller learns whether the request could have reached Redis: `Unreachable` (no
connection, nothing sent) is a sure "not written", any other `redis.RedisError` a "maybe".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import hiredis
import redis
import redis.asyncio

from . import keys
from .keys import QUEUES, SCHEDULE, queue_key, rate_limit_key
from .redis_client import lua_source, score


def idempotency_key(client: str, key: str) -> str:
    """Per client (two clients may pick the same key); hashed (any length, any bytes)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return keys.idempotency_key(client, digest)


@dataclass(frozen=True)
class Submission:
    """One job to write: its queue and payload, and `at` (epoch seconds) when scheduled."""

    queue: str
    payload: str
    at: float | None = None


@dataclass(frozen=True)
class Rate:
    """The client's token bucket: its name, tokens per second, size."""

    client: str
    rate: float
    burst: int


@dataclass(frozen=True)
class Outcome:
    """What Redis did: wrote the jobs; or `replayed` the reply remembered for the key (wrote
    nothing); or `throttled` them: nothing written, the tokens there in `wait` seconds
    (`inf`: never, more jobs than the burst)."""

    replayed: str | None = None
    wait: float = 0.0

    @property
    def throttled(self) -> bool:
        return self.wait > 0


WRITTEN = Outcome()


class Unreachable(redis.ConnectionError):
    """No connection to Redis could be had: nothing was sent, so nothing was written."""


class Submissions:
    """The writes of one gokiq-api process. `write` waits for Redis on the event loop (a
    single job: no thread of its own, which cost more than the write); `write_blocking` in the
    calling thread (a bulk, prepared in that thread too: handing each bulk between a thread
    and the event loop cost it throughput)."""

    def __init__(self, client: redis.Redis, async_client: redis.asyncio.Redis) -> None:
        self.redis, self.async_redis = client, async_client
        self._source = lua_source("submit")
        self._sha = hashlib.sha1(self._source.encode(), usedforsecurity=False).hexdigest()

    async def write(
        self,
        jobs: Sequence[Submission],
        rate: Rate,
        *,
        idempotency: tuple[str, str] | None = None,
        reply: str = "",
        ttl: float = 0.0,
    ) -> Outcome:
        """Take `len(jobs)` tokens from the client's bucket and write `jobs`, in one round
        trip. With `idempotency` (client name, key), remember `reply` for `ttl` seconds; if the
        key was already there, write nothing and return the reply remembered then."""
        command = self._command(jobs, rate, idempotency, reply, ttl)
        pool = self.async_redis.connection_pool
        try:
            connection = await pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # refused, or connect timed out
            raise Unreachable(str(exc)) from exc
        try:
            await connection.send_packed_command([command])
            try:
                return _outcome(await connection.read_response())
            except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
                await connection.send_packed_command([self._loaded(command)])
                await connection.read_response()
                return _outcome(await connection.read_response())
        except BaseException:
            await connection.disconnect()  # its state is unknown: the next user reconnects
            raise
        finally:
            await pool.release(connection)

    def write_blocking(
        self,
        jobs: Sequence[Submission],
        rate: Rate,
        *,
        idempotency: tuple[str, str] | None = None,
        reply: str = "",
        ttl: float = 0.0,
    ) -> Outcome:
        """`write`, waiting in the calling thread."""
        command = self._command(jobs, rate, idempotency, reply, ttl)
        pool = self.redis.connection_pool
        try:
            connection = pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # refused, or connect timed out
            raise Unreachable(str(exc)) from exc
        try:
            connection.send_packed_command([command])
            try:
                return _outcome(connection.read_response())
            except redis.exceptions.NoScriptError:
                connection.send_packed_command([self._loaded(command)])
                connection.read_response()
                return _outcome(connection.read_response())
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _command(
        self,
        jobs: Sequence[Submission],
        rate: Rate,
        idempotency: tuple[str, str] | None,
        reply: str,
        ttl: float,
    ) -> bytes:
        """The EVALSHA, packed by hiredis (redis.asyncio packs in Python, ~3 us an argument,
        and a job is three)."""
        lists = list(dict.fromkeys(queue_key(job.queue) for job in jobs))
        index = {key: n for n, key in enumerate(lists, start=5)}
        args: list[str | int] = [repr(rate.rate), rate.burst, len(jobs)]
        args += [int(ttl * 1000) if idempotency else 0, reply]
        for job in jobs:
            if job.at is None:
                args += [index[queue_key(job.queue)], job.queue, job.payload]
            else:
                args += [0, score(job.at), job.payload]
        key = idempotency_key(*idempotency) if idempotency else keys.NO_IDEMPOTENCY_KEY
        script_keys = [rate_limit_key(rate.client), key, QUEUES, SCHEDULE, *lists]
        return hiredis.pack_command(("EVALSHA", self._sha, len(script_keys), *script_keys, *args))

    def _loaded(self, command: bytes) -> bytes:
        """SCRIPT LOAD, then the command again: both sent at once, two answers to read."""
        return hiredis.pack_command(("SCRIPT", "LOAD", self._source)) + command

    async def close(self) -> None:
        await self.async_redis.aclose()
        self.redis.close()


def _outcome(answer: list[bytes]) -> Outcome:
    if answer[0] == b"replay":
        return Outcome(replayed=answer[1].decode())
    if answer[0] == b"throttled":
        wait = float(answer[1])
        return Outcome(wait=float("inf") if wait < 0 else max(wait, 1e-6))
    return WRITTEN
