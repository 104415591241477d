"""Which Sidekiq the Rails app runs, since some of what gokiq writes depends on it.

Timestamps (`enqueued_at`, `failed_at`, ...) are float seconds for 6/7 and integer ms for 8;
retries differ in details; the Busy page's hash of running jobs is `<identity>:workers` up to
6.4.1 and `:work` from 6.4.2. The `sidekiq_version` setting names the version, or is `auto`:
then it is what the sidecar publishes in Sidekiq's Redis when it boots (`Sidekiq::VERSION`,
read by `SidekiqStore.published_sidekiq_version`; `SidekiqStore.versions` builds a process's
resolver). Until a version is known, whoever would write such data waits
(`SidekiqVersionUnknown`) rather than guess.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger("gokiq")

AUTO = "auto"
MAJORS = (6, 7, 8)
_VERSION = re.compile(r"(\d+(?:\.\d+)*)(?:\.[A-Za-z]+\d*)?")  # 6, 6.4.1, 7.0.0.beta1


class SidekiqVersionUnknown(RuntimeError):
    """No version configured and none published by a sidecar yet."""

    def __init__(self) -> None:
        super().__init__(
            "the app's Sidekiq version is not known yet: waiting for a sidecar to publish it "
            "(it does when it boots) or for GOKIQ_SIDEKIQ_VERSION (setting sidekiq_version)"
        )


@dataclass(frozen=True)
class SidekiqVersion:
    """A Sidekiq version: `release` holds as many numbers as were given (6 -> (6,))."""

    release: tuple[int, ...]

    @classmethod
    def parse(cls, text: str | int) -> SidekiqVersion:
        """`"7"`, `"6.4.1"`, `"7.0.0.beta1"`: a version of Sidekiq gokiq speaks (6 to 8)."""
        match = _VERSION.fullmatch(str(text).strip())
        if not match:
            raise ValueError(f"not a version: {text!r}")
        version = cls(tuple(int(part) for part in match.group(1).split(".")))
        if version.major not in MAJORS:
            raise ValueError(f"Sidekiq {version} is not 6, 7 or 8")
        return version

    @property
    def major(self) -> int:
        return self.release[0]

    def before(self, *release: int) -> bool | None:
        """Is this version older than `release`? None if it names too little to say (6 vs 6.4.2)."""
        if self.release[: len(release)] != release[: len(self.release)]:
            return self.release < release
        return None if len(self.release) < len(release) else self.release < release

    def __str__(self) -> str:
        return ".".join(map(str, self.release))


class SidekiqVersionResolver:
    """The app's Sidekiq version for one process: the setting when it names one, else the last
    version a sidecar published, read again every `refresh` seconds (an app upgraded under
    running workers). A version once known is kept if Redis cannot be read."""

    def __init__(
        self,
        setting: str | int,
        read_published: Callable[[], str | None],
        refresh: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        configured = str(setting).strip().lower()
        self.fixed = None if configured == AUTO else SidekiqVersion.parse(configured)
        self._read_published = read_published
        self._refresh = refresh
        self._clock = clock
        self._published: SidekiqVersion | None = None
        self._read_at = float("-inf")
        self._rejected: str | None = None  # a published value gokiq cannot use, logged once

    @classmethod
    def of(cls, version: int | str | SidekiqVersionResolver) -> SidekiqVersionResolver:
        """A resolver as is; a version (tests, tools) as a resolver that always answers it."""
        if isinstance(version, SidekiqVersionResolver):
            return version
        if str(version).strip().lower() == AUTO:
            raise ValueError("auto: only a resolver that reads what the sidecar publishes")
        return cls(version, _nothing_published)

    @property
    def fresh(self) -> bool:
        """Does `current` answer without reading Redis (a caller on an event loop asks)?"""
        if self.fixed is not None:
            return True
        return self._published is not None and self._clock() - self._read_at < self._refresh

    def current(self) -> SidekiqVersion | None:
        """The version, or None while none is configured or published."""
        if not self.fresh:
            self._read()
        return self.fixed if self.fixed is not None else self._published

    def require(self) -> SidekiqVersion:
        version = self.current()
        if version is None:
            raise SidekiqVersionUnknown()
        return version

    def _read(self) -> None:
        self._read_at = self._clock()  # a known version: next read in `refresh` s, even on errors
        try:
            text = self._read_published()
        except redis.RedisError as exc:
            log.debug("cannot read the published Sidekiq version: %s", exc)
            return
        if text is None:
            return
        try:
            version = SidekiqVersion.parse(text)
        except ValueError as exc:
            if text != self._rejected:
                self._rejected = text
                log.error("a sidecar published Sidekiq %r, which gokiq cannot use: %s", text, exc)
            return
        if version != self._published:
            log.info("the app runs Sidekiq %s (published by its sidecar)", version)
            self._published = version


def _nothing_published() -> None:
    return None
