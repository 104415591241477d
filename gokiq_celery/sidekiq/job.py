"""The Sidekiq job payload as a value object.

A `Job` keeps the exact text it was read from: Redis removes list and sorted-set members by
their bytes, so whoever removes a job must hand back what it read. `Job.replace` writes a new
payload in which every field it did not change keeps its original text, byte for byte, so
fields gokiq does not know (Pro's `bid`, `cattr`, a user's own options) travel untouched.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

ACTIVE_JOB_WRAPPERS = frozenset(
    {"ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper", "Sidekiq::ActiveJob::Wrapper"}
)

_decoder = json.JSONDecoder()
_WHITESPACE = " \t\n\r"

# Ruby's JSON.parse (what Sidekiq and the sidecar read payloads with) refuses NaN and Infinity,
# and nesting deeper than 100: neither could ever run, so neither is a job.
MAX_NESTING = 100


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_strict_decoder = json.JSONDecoder(parse_constant=_no_constants)
# Fields gokiq uses as names (Redis keys, Celery queues and headers, metric labels): strings
# that can be written back as UTF-8 (no lone surrogate from a "\ud800" escape).
_NAME_FIELDS = ("class", "jid", "queue", "retry_queue", "wrapped", "display_class")


class InvalidJob(ValueError):
    """The bytes are not a Sidekiq job. `reason` says why, for logs and metrics."""

    def __init__(self, reason: str, raw: bytes | str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


# One encoder for every call: `json.dumps` with options builds a new one each time (a third of
# the cost of encoding a small value). An encoder keeps no state between calls.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_strict_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> str:
    """JSON as Ruby's Sidekiq writes it: compact, non-ASCII left raw."""
    return _encoder.encode(value)


def strict_dumps(value: Any) -> str:
    """`dumps`, raising ValueError for NaN or an infinite float (which `dumps` writes as
    `NaN` / `Infinity`, text that Ruby's JSON.parse, hence `Job.parse`, refuses)."""
    return _strict_encoder.encode(value)


class Job:
    """One Sidekiq payload: the text read from Redis plus its decoded fields."""

    def __init__(self, text: str, fields: dict[str, Any]) -> None:
        self.text = text
        self.fields = fields

    @classmethod
    def parse(cls, raw: bytes | str) -> Job:
        """Decode and validate a payload; raise `InvalidJob` for anything Sidekiq could not run."""
        try:
            # A str (a Celery message's argument) may hold lone surrogates that bytes cannot.
            text = raw.decode("utf-8") if isinstance(raw, bytes) else _checked(raw)
            fields = _strict_decoder.decode(text)
        except (UnicodeDecodeError, ValueError):
            raise InvalidJob("not JSON", raw) from None
        except RecursionError:
            raise InvalidJob("nested too deep", raw) from None
        if not isinstance(fields, dict):
            raise InvalidJob("not a JSON object", raw)
        if reason := _invalid_fields(text, fields):
            raise InvalidJob(reason, raw)
        return cls(text, fields)

    @classmethod
    def build(cls, fields: Mapping[str, Any]) -> Job:
        """A new payload from fields (tests, demos); validated like a parsed one."""
        return cls.parse(dumps(dict(fields)))

    # -- what gokiq reads -------------------------------------------------------------------

    @property
    def raw(self) -> bytes:
        return self.text.encode("utf-8")

    @property
    def jid(self) -> str:
        return self.fields.get("jid") or ""

    @property
    def class_name(self) -> str:
        return self.fields["class"]

    @property
    def args(self) -> list[Any]:
        return self.fields["args"]

    @property
    def queue(self) -> str:
        return str(self.fields.get("queue") or "default")

    @property
    def retry(self) -> Any:
        """The raw `retry` option: True, False, None (absent) or an integer."""
        return self.fields.get("retry")

    @property
    def is_active_job(self) -> bool:
        return self.class_name in ACTIVE_JOB_WRAPPERS

    @property
    def display_class(self) -> str:
        """The name Sidekiq's logs and Web UI show: the first non-empty string of
        `display_class` and `wrapped`, else `class` (as the sidecar's Runner#display_class:
        tests/test_shared_values.py)."""
        for key in ("display_class", "wrapped"):
            value = self.fields.get(key)
            if isinstance(value, str) and value:
                return value
        return self.class_name

    def log_context(self, queue: str | None = None) -> dict[str, str]:
        """What every log line about this job carries, as Sidekiq's job logger does."""
        return {"jid": self.jid, "class": self.display_class, "queue": queue or self.queue}

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"<Job {self.display_class} jid={self.jid}>"

    # -- writing a changed payload ----------------------------------------------------------

    def replace(self, changes: Mapping[str, Any] = (), remove: tuple[str, ...] = ()) -> Job:
        """A copy with `changes` applied and `remove` dropped; other fields keep their text."""
        changes = dict(changes)
        parts = []
        for key_text, key, value_text in self._members:
            if key in remove:
                continue
            if key in changes:
                value_text = dumps(changes.pop(key))
            parts.append(f"{key_text}:{value_text}")
        parts.extend(f"{dumps(k)}:{dumps(v)}" for k, v in changes.items() if k not in remove)
        return Job.parse("{" + ",".join(parts) + "}")

    @cached_property
    def _members(self) -> list[tuple[str, str, str]]:
        return list(_scan_members(self.text))


POISON_ERROR_CLASS = "Gokiq::InvalidJob"


def poison_entry(raw: bytes | str, reason: str) -> bytes:
    """What the dead set keeps of a payload that is not a job: its bytes, plus Sidekiq's
    `error_class` / `error_message` fields (saying why) when it is a JSON object, the other
    members kept byte for byte."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "backslashreplace")
    try:
        text = data.decode("utf-8")
        if not isinstance(json.loads(text), dict):
            return data
        kept = [
            f"{key_text}:{value_text}"
            for key_text, key, value_text in _scan_members(text)
            if key not in ("error_class", "error_message")
        ]
    except (ValueError, RecursionError, IndexError):
        return data
    kept.append(f'"error_class":{dumps(POISON_ERROR_CLASS)}')
    kept.append(f'"error_message":{dumps(f"not a job: {reason}")}')
    return ("{" + ",".join(kept) + "}").encode("utf-8")


def _checked(text: str) -> str:
    text.encode("utf-8")  # raises UnicodeEncodeError (a ValueError) on a lone surrogate
    return text


def _invalid_fields(text: str, fields: dict[str, Any]) -> str | None:
    """Why Sidekiq could not run these fields, or what gokiq could not write back; None if fine."""
    if not isinstance(fields.get("class"), str) or not fields["class"]:
        return "no class"
    if not isinstance(fields.get("args"), list):
        return "args is not an array"
    for key in _NAME_FIELDS[1:]:
        if fields.get(key) is not None and not isinstance(fields[key], str):
            return f"{key} is not a string"
    # -1 is Sidekiq's own: the Web UI's Retry Now (SortedEntry#retry) takes one off a first
    # retry's 0, and its next failure counts from there (0 again).
    count = fields.get("retry_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < -1):
        return "retry_count is not an integer of -1 or more"
    if "\\u" in text and not all(_encodable(fields.get(key)) for key in _NAME_FIELDS):
        return "a name field is not valid UTF-8"
    # Only a text with that many brackets can be nested that deep: most payloads skip the walk.
    if text.count("[") + text.count("{") > MAX_NESTING and _depth(fields) > MAX_NESTING:
        return "nested too deep"
    return None


def _encodable(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (an object or array counts one), iteratively."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _scan_members(text: str) -> Iterator[tuple[str, str, str]]:
    """Yield (key text, key, value text) for each member of a top-level JSON object."""
    pos = _skip(text, 0)
    if text[pos] != "{":
        raise ValueError("not a JSON object")
    pos = _skip(text, pos + 1)
    if text[pos] == "}":
        return
    while True:
        key, end = _decoder.raw_decode(text, pos)
        key_text = text[pos:end]
        pos = _skip(text, end)
        assert text[pos] == ":"
        pos = _skip(text, pos + 1)
        _, end = _decoder.raw_decode(text, pos)
        yield key_text, key, text[pos:end]
        pos = _skip(text, end)
        if text[pos] == "}":
            return
        pos = _skip(text, pos + 1)  # the comma


def _skip(text: str, pos: int) -> int:
    while text[pos] in _WHITESPACE:
        pos += 1
    return pos


# -- timestamps: float seconds for Sidekiq 6/7, integer milliseconds for 8 --------------------


def timestamp(version: int, now: float | None = None) -> float | int:
    """A payload timestamp (`enqueued_at`, `failed_at`, ...) as Sidekiq `version` writes it."""
    now = time.time() if now is None else now
    return int(now * 1000) if version >= 8 else now


def finite_number(value: Any) -> bool:
    """A JSON number gokiq can compute with: not a bool, NaN, infinite or beyond a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def epoch_seconds(value: Any) -> float | None:
    """Read either timestamp form: a float is seconds, a large integer is milliseconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        if isinstance(value, int) and value > 100_000_000_000:
            return value / 1000.0
        return float(value)
    except OverflowError:  # an integer beyond a float's range: no time at all
        return None
