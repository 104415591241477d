"""Who may call `gokiq-api`: its clients, each with a bearer token and what it may do.

A client has a name (for the audit and the logs, never the token), the job classes and queues
it may enqueue (globs, `fnmatch` style: `Billing::*`, `low-*`; none: it may not enqueue), a
rate in jobs per second with a burst (the token bucket of `gokiq_celery.sidekiq.submissions`)
and whether it may read the job history. They come from the `api_clients` setting (a YAML or
JSON list in gokiq.yml or `GOKIQ_API_CLIENTS`) and/or the YAML file `api_clients_file`; each
plain token of `api_tokens` is a client that may only read (what those tokens always were).

Tokens are matched in constant time: each configured token's SHA-256 is compared with the
given one's by `hmac.compare_digest`, every one of them, whichever matches.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .connection import valid_header_value

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FIELDS = {"name", "token", "classes", "queues", "rate", "burst", "read"}
EXAMPLE = "[{name: etl, token: <16+ characters>, classes: [HardJob], queues: [default]}]"
MIN_TOKEN_LENGTH = 16
DEFAULT_RATE = 100.0  # jobs per second, when a client names none


class ApiClientError(ValueError):
    """A client entry gokiq-api cannot use; the message never holds a token."""


@dataclass(frozen=True)
class ApiClient:
    name: str
    token: str = field(repr=False)
    classes: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    rate: float = DEFAULT_RATE
    burst: int = 0  # 0: one second's worth of `rate` (at least 1)
    read: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ApiClientError(
                f"client name {self.name!r}: 1-64 letters, digits, '_', '.', ':' or '-'"
            )
        if not self.token or not valid_header_value(self.token):
            raise ApiClientError(f"client {self.name}: token must be printable ASCII")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ApiClientError(f"client {self.name}: rate must be > 0 jobs/s, got {self.rate}")
        if self.burst < 0:
            raise ApiClientError(f"client {self.name}: burst must be >= 0, got {self.burst}")

    @property
    def bucket_size(self) -> int:
        return self.burst or max(1, math.ceil(self.rate))

    def may_enqueue(self, job_class: str) -> bool:
        return _matches(job_class, self.classes)

    def may_use_queue(self, queue: str) -> bool:
        return _matches(queue, self.queues)


@functools.lru_cache(maxsize=4096)  # a bulk of 1,000 jobs asks the same twice per job
def _matches(value: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, glob) for glob in globs)


def parse_clients(raw: Any, source: str = "api_clients") -> tuple[ApiClient, ...]:
    """A list of client mappings (or its YAML/JSON text) -> clients; `ApiClientError` naming
    the entry (by position or name) for anything wrong."""
    if isinstance(raw, str):
        if not raw.strip():
            return ()
        try:
            raw = yaml.safe_load(raw)  # JSON is YAML too
        except yaml.YAMLError:
            raise ApiClientError(f"{source}: not valid YAML or JSON; expected {EXAMPLE}") from None
    if raw is None:
        return ()
    if isinstance(raw, tuple) and all(isinstance(c, ApiClient) for c in raw):
        return raw
    if not isinstance(raw, list):
        raise ApiClientError(f"{source}: must be a list of clients, such as {EXAMPLE}")
    return tuple(_client(entry, f"{source}[{n}]") for n, entry in enumerate(raw))


def read_clients_file(path: str) -> tuple[ApiClient, ...]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ApiClientError(f"api_clients_file {path}: {exc.strerror}") from None
    return parse_clients(text, f"api_clients_file {path}")


def _client(entry: Any, where: str) -> ApiClient:
    if not isinstance(entry, Mapping):
        raise ApiClientError(f"{where}: must be a mapping with name and token")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ApiClientError(
            f"{where}: unknown field(s) {', '.join(map(str, unknown))} "
            f"(a client has {', '.join(sorted(_FIELDS))})"
        )
    if not isinstance(entry.get("name"), str) or not isinstance(entry.get("token"), str):
        raise ApiClientError(f"{where}: name and token are required strings")
    if len(entry["token"]) < MIN_TOKEN_LENGTH:  # a token that can be guessed is no token
        raise ApiClientError(f"{where}: token must be at least {MIN_TOKEN_LENGTH} characters")
    classes = _globs(entry.get("classes", ()), f"{where}.classes")
    queues = _globs(entry.get("queues", ()), f"{where}.queues")
    read = _bool(entry.get("read", False), f"{where}.read")
    try:
        rate, burst = float(entry.get("rate", DEFAULT_RATE)), int(entry.get("burst", 0))
    except (TypeError, ValueError):
        raise ApiClientError(f"{where}: rate must be a number and burst an integer") from None
    try:
        return ApiClient(entry["name"], entry["token"], classes, queues, rate, burst, read)
    except ApiClientError as exc:
        raise ApiClientError(f"{where}: {exc}") from None


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ApiClientError(f"{where}: must be a list of non-empty glob strings")
    return tuple(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ApiClientError(f"{where}: must be true or false")
    return value


def readers_from_tokens(api_tokens: str) -> tuple[ApiClient, ...]:
    """`api_tokens` (comma-separated): clients that may read the history, nothing else."""
    tokens = [t.strip() for t in api_tokens.split(",") if t.strip()]
    return tuple(
        ApiClient(f"token-{n}", token, read=True) for n, token in enumerate(tokens, start=1)
    )


class ApiClients:
    """The configured clients, found by token in constant time."""

    def __init__(self, clients: Sequence[ApiClient]) -> None:
        names = [c.name for c in clients]
        duplicate = {n for n in names if names.count(n) > 1}
        if duplicate:
            raise ApiClientError(
                f"api_clients: name(s) used twice: {', '.join(sorted(duplicate))} (across "
                "api_clients, api_clients_file and api_tokens, whose clients are token-1, "
                "token-2, ...): give each client a name of its own"
            )
        digests = [_digest(c.token) for c in clients]
        if len(set(digests)) != len(digests):
            raise ApiClientError(
                "api_clients: two clients share one token (across api_clients, "
                "api_clients_file and api_tokens): give each client a token of its own"
            )
        self._by_digest = list(zip(digests, clients, strict=True))

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, token: str | None) -> ApiClient | None:
        given = _digest(token or "")
        found = None
        for digest, client in self._by_digest:  # no early exit: the time says nothing
            if hmac.compare_digest(given, digest) and token:
                found = client
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
