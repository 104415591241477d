"""Jobs submitted through gokiq-api, written as Sidekiq's client writes them (SADD `queues` +
LPUSH `queue:<q>`, or ZADD `schedule` for a time in the future) and, for a request with an
`Idempotency-Key`, the reply remembered in the same atomic step (`lua/submit.lua`): a retried
request gets the first reply back and writes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from .store import QUEUES, SCHEDULE, _score, queue_key

_SCRIPT = (Path(__file__).with_name("lua") / "submit.lua").read_text


def idempotency_key(client: str, key: str) -> str:
    """Per client (two clients may pick the same key); hashed (any length, any bytes)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return f"gokiq:idempotency:{client}:{digest}"


@dataclass(frozen=True)
class Submission:
    """One job to write: its queue and payload, and `at` (epoch seconds) when scheduled."""

    queue: str
    payload: str
    at: float | None = None


class Submissions:
    def __init__(self, client: redis.Redis) -> None:
        self._submit = client.register_script(_SCRIPT())

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
                args += [0, _score(job.at), job.payload]
        key = idempotency_key(*idempotency) if idempotency else "gokiq:idempotency:-"
        previous = self._submit(keys=[key, QUEUES, SCHEDULE, *lists], args=args)
        return previous.decode() if previous is not None else None
