"""Jobs submitted through gokiq-api, written as Sidekiq's client writes them (SADD `queues` +
LPUSH `queue:<q>`, or ZADD `schedule` for a time in the future) and, for a request with an
`Idempotency-Key`, the reply remembered in the same atomic step (`lua/submit.lua`): a retried
request gets the first reply back and writes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from . import keys
from .keys import QUEUES, SCHEDULE, queue_key
from .redis_client import Scripts, score


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


class Submissions:
    def __init__(self, client: redis.Redis) -> None:
        self._submit = Scripts(client)("submit")

    def write(
        self,
        jobs: Sequence[Submission],
        *,
        idempotency: tuple[str, str] | None = None,
        reply: str = "",
        ttl: float = 0.0,
    ) -> str | None:
        """Write `jobs` in one round trip. With `idempotency` (client name, key), remember
        `reply` for `ttl` seconds; if the key was already there, write nothing and return the
        reply remembered then. None: written now."""
        lists = list(dict.fromkeys(queue_key(job.queue) for job in jobs))
        index = {key: n for n, key in enumerate(lists, start=4)}
        args: list[str | int] = [int(ttl * 1000) if idempotency else 0, reply]
        for job in jobs:
            if job.at is None:
                args += [index[queue_key(job.queue)], job.queue, job.payload]
            else:
                args += [0, score(job.at), job.payload]
        key = idempotency_key(*idempotency) if idempotency else keys.NO_IDEMPOTENCY_KEY
        previous = self._submit(keys=[key, QUEUES, SCHEDULE, *lists], args=args)
        return previous.decode() if previous is not None else None
