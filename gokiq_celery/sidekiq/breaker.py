"""The sidecar's circuit breaker as it lives in Redis: pybreaker's storage, shared by every
worker and read by the bridge (which holds jobs back while it is open).

pybreaker names the keys (`<namespace>:pybreaker:<field>`); the namespace is keys.py's.
"""

from __future__ import annotations

import time

import pybreaker
import redis

from .keys import BREAKER_NAMESPACE


class SharedBreakerStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage (state shared by every worker and the bridge), read at most
    every `refresh` seconds.

    The stock storage makes two round trips on every call, GET state before and SET the
    failure counter to 0 after a success. Here state and counter are read together, at most
    every `refresh` seconds, and a success writes the counter only when it is not 0 already.
    Writes that matter (a failure, a state change) go to Redis at once; another worker's trip is
    seen within `refresh`.
    """

    REFRESH = 0.25

    def __init__(self, client: redis.Redis, refresh: float = REFRESH, clock=time.monotonic):
        super().__init__(pybreaker.STATE_CLOSED, client, namespace=BREAKER_NAMESPACE)
        self._refresh = refresh
        self._clock = clock
        self._read_at = float("-inf")
        self._state = pybreaker.STATE_CLOSED
        self._counter = 0

    def _read(self) -> None:
        if self._clock() - self._read_at < self._refresh:
            return
        keys = self._namespace("state"), self._namespace("fail_counter")
        try:
            state, counter = self._redis.mget(keys)
        except redis.RedisError:
            self.logger.exception("RedisError: falling back to default circuit state")
            self._state, self._counter = self._fallback_circuit_state, 0
            return
        if state is None:  # keys gone (flushed): start again as pybreaker does
            self._initialize_redis_state(self._fallback_circuit_state)
        self._state = state.decode() if state else self._fallback_circuit_state
        self._counter = int(counter or 0)
        self._read_at = self._clock()

    @property
    def state(self) -> str:
        self._read()
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        pybreaker.CircuitRedisStorage.state.fset(self, state)
        self._state = str(state)

    @property
    def counter(self) -> int:
        self._read()
        return self._counter

    def increment_counter(self) -> None:
        try:
            self._counter = int(self._redis.incr(self._namespace("fail_counter")))
        except redis.RedisError:
            self.logger.exception("RedisError")

    def reset_counter(self) -> None:
        self._read()
        if self._counter:
            super().reset_counter()
            self._counter = 0


class SidecarBreaker:
    """The breaker's state as the bridge reads it (the workers trip and reset it)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def storage(self) -> pybreaker.CircuitRedisStorage:
        """pybreaker's shared state for the sidecar breaker (creates its keys if missing)."""
        return pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, self.redis, namespace=BREAKER_NAMESPACE
        )

    @staticmethod
    def tripped(storage: pybreaker.CircuitRedisStorage) -> bool:
        """Whether the stored state is open, however long ago it opened."""
        return storage.state == pybreaker.STATE_OPEN

    def is_open(
        self,
        storage: pybreaker.CircuitRedisStorage | None = None,
        reset_timeout: float | None = None,
    ) -> bool:
        """Whether the workers' sidecar breaker is open.

        With `reset_timeout`, an open breaker older than that counts as closed: pybreaker only
        moves to half-open when a worker makes a call, and a worker only calls when it gets a
        job, so a bridge that waited for "closed" forever would wait forever.
        """
        storage = storage or self.storage()
        if not self.tripped(storage):
            return False
        if reset_timeout is None:
            return True
        opened_at = storage.opened_at
        return opened_at is None or time.time() < opened_at.timestamp() + reset_timeout
