"""One typed settings object for every gokiq process.

Values come from defaults, then `gokiq.yml` (path from `--config` or `GOKIQ_CONFIG`), then the
environment. Each field's environment variable is `GOKIQ_<FIELD>` except the two that other
tools already name: `REDIS_URL` (Sidekiq's) and `CELERY_BROKER_URL` (Celery's).
Everything is validated at start-up; a bad value raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from .api_clients import ApiClient, ApiClientError, ApiClients, parse_clients, read_clients_file
from .api_clients import readers_from_tokens as _readers
from .connection import valid_header_value
from .sidekiq.version import AUTO, SidekiqVersion


class ConfigError(ValueError):
    """A setting is missing or has a value gokiq cannot use."""


@dataclass(frozen=True)
class QueueSpec:
    """One Sidekiq queue and its weight, as in `sidekiq -q name,weight`."""

    name: str
    weight: int = 0


# Fields whose environment variable is not simply GOKIQ_<NAME>.
_ENV_NAMES = {"redis_url": "REDIS_URL", "celery_broker_url": "CELERY_BROKER_URL"}


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    celery_broker_url: str = ""  # empty: Sidekiq's Redis server, next db number
    sidecar_url: str = "http://127.0.0.1:7433"
    sidecar_token: str = field(default="", repr=False)
    sidecar_connect_timeout: float = 2.0
    job_timeout: float = 600.0  # read timeout of one /jobs/execute call
    queues: tuple[QueueSpec, ...] = (QueueSpec("default"),)
    strict: bool = False
    queue_map: Mapping[str, str] = field(default_factory=dict)  # Sidekiq queue -> Celery queue
    sidekiq_version: str = AUTO  # or 6, 7, 8, 6.4.1: gokiq_celery.sidekiq.version
    max_retries: int = 25
    max_celery_countdown: float = 300.0
    delivery_timeout: float = 300.0  # a message no worker took by then is published again
    dead_max_jobs: int = 10_000
    dead_timeout_in_seconds: int = 15_552_000
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 30.0
    worker_concurrency: int = 20
    worker_pool: str = "threads"  # Celery ignores `--pool=prefork` when a pool is configured
    worker_prefetch_multiplier: int = 2  # messages a worker holds: concurrency x this
    max_pending: int = 0  # 0: derived from worker_concurrency
    publish_batch_size: int = 100
    scheduler_poll_interval: float = 0.25
    bridge_heartbeat_ttl: float = 30.0
    bridge_recovery_interval: float = 30.0
    bridge_metrics_port: int = 9478
    bridge_bind: str = "127.0.0.1"
    worker_metrics_port: int = 9479  # 0: no /metrics from the worker
    worker_metrics_bind: str = "127.0.0.1"
    sidekiq_heartbeat: float = 10.0  # each worker's beat on Sidekiq's Busy page; 0: not shown
    log_level: str = "INFO"
    log_format: str = "json"
    # The job history (gokiq_history, README "Job history"); empty history_url: off.
    history_url: str = field(default="", repr=False)  # may hold a password
    history_retention: float = 7 * 86400.0  # seconds; "7d", "12h", "30m" accepted
    history_record_args: bool = False  # arguments may hold personal data
    history_buffer: int = 10_000  # events held while the database is slow; more are dropped
    history_migrate: bool = False  # apply the migrations at start-up
    api_bind: str = "127.0.0.1"
    api_port: int = 9480
    api_tokens: str = field(default="", repr=False)  # comma-separated bearer tokens (read only)
    # The ingestion API (gokiq_ingest): clients with scopes and rates (gokiq_celery.api_clients).
    api_clients: tuple[ApiClient, ...] = ()
    api_clients_file: str = ""  # YAML list of clients, read at start-up
    api_max_body_bytes: int = 5 * 1024 * 1024
    api_classes_refresh: float = 30.0  # seconds between reads of the sidecar's GET /classes
    api_idempotency_ttl: float = 86400.0  # how long an Idempotency-Key is remembered

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or _next_db(self.redis_url)

    @property
    def run_window(self) -> float:
        """How long a started job can keep its delivery before it is presumed lost."""
        return self.sidecar_connect_timeout + self.job_timeout + 10.0

    @property
    def pending_limit(self) -> int:
        # When a queue is full the bridge re-reads it every ~15 ms, so the limit is what a fleet
        # may drain in that time: at 2 x concurrency (40) one bridge fed at most ~2,600 jobs/s
        # however many workers there were; at 10 x it reaches its own ceiling (bench VM).
        return self.max_pending or 10 * self.worker_concurrency

    @functools.cached_property
    def api_client_list(self) -> ApiClients:
        """Every client of gokiq-api: `api_tokens` (read only), `api_clients`, the file's."""
        extra = read_clients_file(self.api_clients_file) if self.api_clients_file else ()
        return ApiClients([*_readers(self.api_tokens), *self.api_clients, *extra])

    def celery_queue(self, sidekiq_queue: str) -> str:
        return self.queue_map.get(sidekiq_queue, sidekiq_queue)

    def __post_init__(self) -> None:
        _validate(self)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Defaults < YAML file < environment < explicit overrides (command-line flags)."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get("GOKIQ_CONFIG")
    values: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for f in dataclasses.fields(Settings):
        env_name = _ENV_NAMES.get(f.name, f"GOKIQ_{f.name.upper()}")
        if environ.get(env_name, "").strip():
            values[f.name] = environ[env_name]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**{name: _coerce(name, raw) for name, raw in values.items()})


@functools.cache
def process_settings() -> Settings:
    """This process's settings (environment and `GOKIQ_CONFIG`), read once."""
    return load_settings()


def parse_queues(text: str | list[Any]) -> tuple[QueueSpec, ...]:
    """`"critical,3 default,1"`, `"critical,default"` (Celery's -Q form: two queues), or a YAML
    list of `name` / `[name, weight]` -> QueueSpecs."""
    items = _queue_items(text) if isinstance(text, str) else text
    specs = []
    for item in items:
        if isinstance(item, list | tuple):
            if not 1 <= len(item) <= 2:
                raise ConfigError(f"queues: {item!r} must be [name] or [name, weight]")
            name, weight = (item[0], item[1] if len(item) > 1 else 0)
        else:
            name, _, weight = str(item).partition(",")
        name = str(name).strip()
        if not name or ":" in name or " " in name:
            raise ConfigError(f"queues: bad queue name {name!r} in {text!r}")
        try:
            weight = int(weight or 0)
        except ValueError:
            raise ConfigError(f"queues: weight of {name!r} must be an integer") from None
        if weight < 0:
            raise ConfigError(f"queues: weight of {name!r} must be >= 0")
        specs.append(QueueSpec(name, weight))
    if not specs:
        raise ConfigError("queues: at least one queue is required")
    return tuple(specs)


def _queue_items(text: str) -> list[tuple[str, str]]:
    """Split on spaces, `;` and commas; an integer after a comma is the weight of the queue
    before it (a weight is an integer, so `name,weight` stays unambiguous)."""
    items: list[tuple[str, str]] = []
    for word in text.replace(";", " ").split():
        for position, token in enumerate(filter(None, word.split(","))):
            if not re.fullmatch(r"[+-]?\d+", token):
                items.append((token, ""))
            elif position and items[-1][1] == "":
                items[-1] = (items[-1][0], token)
            else:
                raise ConfigError(f"queues: weight {token} in {text!r} follows no queue name")
    return items


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def _coerce(name: str, raw: Any) -> Any:
    kind = Settings.__dataclass_fields__[name].type
    try:
        if name == "queues":
            return raw if _is_queue_specs(raw) else parse_queues(raw)
        if name == "queue_map":
            return _parse_queue_map(raw)
        if name in ("history_retention", "api_idempotency_ttl"):
            return _finite(parse_duration(raw))
        if name == "api_clients":
            return parse_clients(raw)
        if kind == "bool":
            return _parse_bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return _finite(float(raw))
        return str(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        if isinstance(exc, ApiClientError):
            raise ConfigError(str(exc)) from None
        raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from None


def _finite(value: float) -> float:
    if not math.isfinite(value):  # "nan" and "inf" parse as floats; no duration is either
        raise ValueError(value)
    return value


def _is_queue_specs(raw: Any) -> bool:
    return isinstance(raw, tuple) and all(isinstance(q, QueueSpec) for q in raw)


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def _parse_queue_map(raw: Any) -> dict[str, str]:
    """A mapping, or `"sidekiq_q=celery_q,other=celery_other"` from the environment."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    pairs = [p for p in str(raw).replace(" ", ",").split(",") if p]
    if not all("=" in p for p in pairs):
        raise ConfigError(f"queue_map: expected 'sidekiq_queue=celery_queue,...', got {raw!r}")
    return dict(p.split("=", 1) for p in pairs)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: Any) -> float:
    """Seconds from a number or `"7d"`, `"12h"`, `"30m"`, `"45s"`."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    text = str(raw).strip().lower()
    if text[-1:] in _DURATION_UNITS:
        return float(text[:-1]) * _DURATION_UNITS[text[-1]]
    return float(text)


_POOLS = {"threads", "prefork", "solo"}
_PATCHING_POOLS = {"gevent", "eventlet"}  # need Celery's monkey-patching, which reads -P only
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def _validate(s: Settings) -> None:
    if urlsplit(s.redis_url).scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError("redis_url: must be a redis://, rediss:// or unix:// URL")
    if s.celery_broker_url and urlsplit(s.celery_broker_url).scheme not in {
        "redis",
        "rediss",
        "amqp",
        "amqps",
        "pyamqp",
        "memory",
    }:
        raise ConfigError("celery_broker_url: must be a redis:// or amqp:// URL")
    sidecar = urlsplit(s.sidecar_url)
    if sidecar.scheme not in {"http", "https"} or not sidecar.hostname:
        raise ConfigError("sidecar_url: must be an http:// or https:// URL with a host")
    if not valid_header_value(s.sidecar_token):  # the value is a secret: not in the message
        raise ConfigError("sidecar_token: must be printable ASCII (it is sent as an HTTP header)")
    if "change-me" in s.sidecar_token:  # docker/.env.example's placeholder, known to everyone
        raise ConfigError("sidecar_token: still the change-me placeholder of .env.example")
    if str(s.sidekiq_version).strip().lower() != AUTO:
        try:
            SidekiqVersion.parse(s.sidekiq_version)
        except ValueError:
            raise ConfigError(
                "sidekiq_version: must be auto, 6, 7, 8 or a version such as 6.4.1, "
                f"got {s.sidekiq_version!r}"
            ) from None
    if s.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(sorted(_LOG_LEVELS))}")
    if s.worker_pool in _PATCHING_POOLS:  # set here, the worker would start unpatched and hang
        raise ConfigError(
            f"worker_pool: {s.worker_pool} must be given on the worker's command line, where "
            f"Celery monkey-patches before anything loads: leave worker_pool unset and run "
            f"`celery -A gokiq_celery worker -P {s.worker_pool}`"
        )
    if s.worker_pool not in _POOLS:
        raise ConfigError(f"worker_pool: must be one of {', '.join(sorted(_POOLS))}")
    if s.log_format not in {"json", "text"}:
        raise ConfigError("log_format: must be 'json' or 'text'")
    positive = (
        "sidecar_connect_timeout",
        "job_timeout",
        "max_celery_countdown",
        "dead_max_jobs",
        "dead_timeout_in_seconds",
        "breaker_fail_max",
        "breaker_reset_timeout",
        "worker_concurrency",
        "worker_prefetch_multiplier",
        "publish_batch_size",
        "scheduler_poll_interval",
        "bridge_heartbeat_ttl",
        "bridge_recovery_interval",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(s, name)}")
    if not 0 <= s.sidekiq_heartbeat <= 30:  # readers drop a process silent for 60 s
        raise ConfigError(
            f"sidekiq_heartbeat: must be 0 (off) to 30 seconds, got {s.sidekiq_heartbeat}"
        )
    if s.publish_batch_size > 1000:  # Lua's unpack() in the fetch script caps a batch
        raise ConfigError(f"publish_batch_size: must be <= 1000, got {s.publish_batch_size}")
    for name in ("max_retries", "max_pending", "bridge_metrics_port", "worker_metrics_port"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(s, name)}")
    _validate_history(s)
    _validate_api(s)


def _validate_api(s: Settings) -> None:
    for name in ("api_max_body_bytes", "api_classes_refresh", "api_idempotency_ttl"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(s, name)}")
    try:
        s.api_client_list  # noqa: B018 - reads the file and checks names and tokens, once
    except ApiClientError as exc:
        raise ConfigError(str(exc)) from None


def _validate_history(s: Settings) -> None:
    scheme = urlsplit(s.history_url).scheme
    if s.history_url and scheme not in {"postgres", "postgresql", "postgresql+psycopg", "sqlite"}:
        raise ConfigError("history_url: must be empty (off), a postgresql:// or a sqlite:/// URL")
    for name in ("history_retention", "history_buffer"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(s, name)}")
    if not 0 < s.api_port < 65536:
        raise ConfigError(f"api_port: must be 1 to 65535, got {s.api_port}")
    tokens = s.api_tokens.split(",") if s.api_tokens.strip() else []
    if any(not t.strip() or not valid_header_value(t.strip()) for t in tokens):
        # The values are secrets: not in the message.
        raise ConfigError("api_tokens: must be comma-separated printable tokens, none empty")


def _next_db(redis_url: str) -> str:
    """Celery's default broker: the same Redis server as Sidekiq, one db number higher."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        return redis_url
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))
