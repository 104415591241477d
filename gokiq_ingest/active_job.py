"""An ActiveJob class enqueued as ActiveJob's Sidekiq adapter enqueues it: Sidekiq's wrapper
class, `wrapped`, and the job serialized as `ActiveJob::Base#serialize` serializes it (its
`job_id` and `arguments`, Rails 6.1 / 7.0 layout; 7.1+ adds `scheduled_at` and nanoseconds).

Arguments are JSON values: an object is a Hash with string keys (ActiveJob marks it with an
empty `_aj_symbol_keys`), `kwargs` become keyword arguments (`_aj_ruby2_keywords`). A GlobalID
is passed as `{"_aj_globalid": "gid://app/User/1"}` and left as it is: the sidecar's
ActiveJob locates the record when the job runs, and fails the job if there is none. Any other
object with ActiveJob's reserved keys (`_aj_*`) is refused, as ActiveJob refuses it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

GLOBALID_KEY = "_aj_globalid"
SYMBOL_KEYS_KEY = "_aj_symbol_keys"
RUBY2_KEYWORDS_KEY = "_aj_ruby2_keywords"
RESERVED = frozenset(
    {
        GLOBALID_KEY,
        SYMBOL_KEYS_KEY,
        RUBY2_KEYWORDS_KEY,
        "_aj_hash_with_indifferent_access",
        "_aj_serialized",
    }
)


class NotSerializable(ValueError):
    """An argument ActiveJob would refuse (ActiveJob::SerializationError)."""


def serialize_arguments(args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> list[Any]:
    out = [_argument(a) for a in args]
    if kwargs:
        out.append({**_hash(kwargs), RUBY2_KEYWORDS_KEY: list(kwargs)})
    return out


def _argument(value: Any) -> Any:
    if isinstance(value, list):
        return [_argument(v) for v in value]
    if isinstance(value, dict):
        if _is_global_id(value):
            return value
        return {**_hash(value), SYMBOL_KEYS_KEY: []}
    return value


def _is_global_id(value: Mapping[str, Any]) -> bool:
    gid = value.get(GLOBALID_KEY)
    return len(value) == 1 and isinstance(gid, str) and gid.startswith("gid://")


def _hash(value: Mapping[str, Any]) -> dict[str, Any]:
    reserved = RESERVED.intersection(value)
    if reserved:
        raise NotSerializable(
            f"an argument object uses ActiveJob's reserved key {sorted(reserved)[0]!r} "
            f'(a GlobalID is exactly {{"{GLOBALID_KEY}": "gid://app/Model/id"}})'
        )
    return {k: _argument(v) for k, v in value.items()}


def serialize_job(
    job_class: str,
    arguments: list[Any],
    *,
    queue: str,
    priority: int | None,
    context: Mapping[str, Any],
    rails_version: str | None,
    now: float,
    scheduled_at: float | None = None,
) -> dict[str, Any]:
    """What `job.serialize` returns at enqueue time (provider_job_id is set only after)."""
    modern = rails_at_least(rails_version, 7, 1)
    data = {
        "job_class": job_class,
        "job_id": str(uuid.uuid4()),
        "provider_job_id": None,
        "queue_name": queue,
        "priority": priority,
        "arguments": arguments,
        "executions": 0,
        "exception_executions": {},
        "locale": context.get("locale") or "en",
        "timezone": context.get("timezone"),
        "enqueued_at": _iso(now, 9 if modern else 0),
    }
    if modern:
        data["scheduled_at"] = _iso(scheduled_at, 9) if scheduled_at else None
    return data


def _iso(epoch: float, digits: int) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    if not digits:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}000Z"


def rails_at_least(version: str | None, *release: int) -> bool:
    """Whether the app's Rails `version` (None: unknown, taken as older) is `release` or newer."""
    try:
        parts = tuple(int(p) for p in (version or "").split(".")[:2])
    except ValueError:
        return False
    return parts >= release
