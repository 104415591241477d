"""Capped exponential backoff with jitter, for reconnecting to Redis or the broker."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempts = 0

    def next(self) -> float:
        """The next delay: first, 2*first, 4*first, ... up to `cap`, each ±25% so that many
        bridges do not hammer a recovering Redis in step."""
        delay = min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return delay * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.attempts = 0
