"""Sidekiq's process registry, the Busy page: each Celery worker shows there as a Sidekiq
process (gokiq_celery/heartbeat.py beats it)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis

from .keys import PROCESSES, process_signals_key, process_work_keys
from .version import SidekiqVersion

PROCESS_TTL = 60  # seconds; readers drop an identity whose hash has expired


class ProcessRegistry:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def beat(
        self,
        identity: str,
        fields: Mapping[str, str | int | float],
        work: Mapping[str, str],
        version: SidekiqVersion,
    ) -> str | None:
        """One heartbeat of a process on the Busy page, as Sidekiq's launcher writes it: the
        running jobs (`work`: tid -> JSON) replace the last beat's, the identity's hash gets
        `fields`, both live PROCESS_TTL seconds. Returns a signal sent to the process, if any."""
        work_keys = process_work_keys(identity, version)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.unlink(*work_keys)
            if work:
                for key in work_keys:
                    pipe.hset(key, mapping=work)
                    pipe.expire(key, PROCESS_TTL)
            pipe.sadd(PROCESSES, identity)
            pipe.hset(identity, mapping=fields)
            pipe.expire(identity, PROCESS_TTL)
            pipe.rpop(process_signals_key(identity))
            signal = pipe.execute()[-1]
        return signal.decode() if signal else None

    def unregister(self, identity: str, version: SidekiqVersion) -> None:
        """A clean exit, as Sidekiq's: out of `processes`, running jobs gone; the identity's
        hash is left to expire."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(PROCESSES, identity)
            pipe.unlink(*process_work_keys(identity, version))
            pipe.execute()

    def round_trip_us(self) -> int:
        """One PING's round trip in microseconds (the Busy page's RTT)."""
        started = time.perf_counter()
        self.redis.ping()
        return int((time.perf_counter() - started) * 1e6)
