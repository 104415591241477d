"""Every Redis key gokiq reads or writes, spelled here and nowhere else.

Sidekiq's own keys (README, "How gokiq maps Sidekiq onto Celery"): the `queue:<q>` lists and
the `queues` set, the `schedule`, `retry` and `dead` sorted sets, the `stat:*` counters, and
the process registry (`processes` and each identity's hashes and signals). gokiq's own keys all
start with `gokiq:` so they never collide with Sidekiq's, Pro's (`queue:sq|...`) or
Enterprise's. Each module of this package owns the keys of its part of the data model; this
one only names them, and a new part of the model (a new module here) adds its names here too.
tests/test_keys.py checks that no module outside the package spells a key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .version import SidekiqVersion

# -- Sidekiq's keys ---------------------------------------------------------------------------

QUEUES = "queues"  # set of queue names
SCHEDULE = "schedule"  # zset: job -> when it runs (perform_at)
RETRY = "retry"  # zset: failed job -> when it is retried
DEAD = "dead"  # zset: job -> when it died
SCHEDULED_SETS = (RETRY, SCHEDULE)  # the poller's order: retries first, as Sidekiq does
STAT_PROCESSED = "stat:processed"
STAT_FAILED = "stat:failed"
# The process registry behind the Web UI's Busy page: the `processes` set of identities, a hash
# per identity (the identity is its key), a hash of running jobs per identity, a signal list.
PROCESSES = "processes"


def queue_key(queue: str) -> str:
    return f"queue:{queue}"


def stat_day_key(total: str, day: str) -> str:
    """The per-UTC-day counter beside `total` (STAT_PROCESSED or STAT_FAILED)."""
    return f"{total}:{day}"


def process_work_keys(identity: str, version: SidekiqVersion) -> list[str]:
    """The hash of a process's running jobs: `:workers` up to 6.4.1, `:work` from 6.4.2, so
    both for a version that does not say which (a bare "6")."""
    older = version.before(6, 4, 2)
    if older is None:
        return [f"{identity}:workers", f"{identity}:work"]
    return [f"{identity}:workers" if older else f"{identity}:work"]


def process_signals_key(identity: str) -> str:
    """Where `Sidekiq::Process#quiet!` / `#stop!` push TSTP / TERM for the process to pop."""
    return f"{identity}-signals"


# -- gokiq's keys -----------------------------------------------------------------------------

# The app's `Sidekiq::VERSION`, written by every sidecar when it boots (version.py; the Ruby
# side's GokiqSidecar::SIDEKIQ_VERSION_KEY).
SIDEKIQ_VERSION_KEY = "gokiq:sidekiq_version"
# pybreaker's CircuitRedisStorage keeps the sidecar breaker under `<namespace>:pybreaker:<name>`.
BREAKER_NAMESPACE = "gokiq:sidecar"
BREAKER_FIELDS = ("state", "fail_counter", "opened_at")
# The bridge registry (bridges.py): live bridge ids, each with a heartbeat key and the queues
# it fetches from.
BRIDGES = "gokiq:bridges"
# The delivery ledger (ledger.py).
DELIVERIES = "gokiq:deliveries"  # hash: token -> queue and payload
DELIVERY_DEADLINES = "gokiq:deliveries:due"  # zset: token -> when to presume the message lost
DELIVERY_HOLDERS = "gokiq:deliveries:holders"  # hash: token -> worker process
WORKERS = "gokiq:workers"  # zset: worker process -> last sign of life
BROKER_RUN_ID = "gokiq:broker:run_id"  # string: the broker Redis's run_id a bridge last saw


def breaker_key(field: str) -> str:
    """The Redis key pybreaker builds for one of BREAKER_FIELDS (for reading it raw)."""
    return f"{BREAKER_NAMESPACE}:pybreaker:{field}"


def bridge_key(bridge_id: str) -> str:
    """The bridge's heartbeat: a string with a TTL; once it is gone, the bridge is dead."""
    return f"gokiq:bridge:{bridge_id}"


def bridge_queues_key(bridge_id: str) -> str:
    """The queues the bridge fetches from, i.e. where its in-flight lists may be."""
    return f"gokiq:bridge:{bridge_id}:queues"


def inflight_prefix(bridge_id: str) -> str:
    return f"gokiq:inflight:{bridge_id}:"


def inflight_key(bridge_id: str, queue: str) -> str:
    """Jobs the bridge fetched from `queue` and has not handed to the ledger yet."""
    return inflight_prefix(bridge_id) + queue


def moving_key(bridge_id: str, set_name: str) -> str:
    """Due jobs the bridge took out of `set_name` and has not pushed onto a queue yet."""
    return f"gokiq:moving:{bridge_id}:{set_name}"


def sidecar_deaths_key(jid: str) -> str:
    return f"gokiq:sidecar-deaths:{jid}"


# gokiq-api's ingestion (gokiq_ingest, submissions.py): each client's token bucket, and the
# reply remembered for each Idempotency-Key (the key given is hashed).
def rate_limit_key(client: str) -> str:
    return f"gokiq:ratelimit:{client}"


def idempotency_key(client: str, key_digest: str) -> str:
    return f"gokiq:idempotency:{client}:{key_digest}"


NO_IDEMPOTENCY_KEY = "gokiq:idempotency:-"  # the script's key slot, unused without a key
