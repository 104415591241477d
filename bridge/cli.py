"""`gokiq-bridge`: move a Rails app's Sidekiq jobs onto Celery queues, reliably."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from gokiq_celery.logs import setup_logging
from gokiq_celery.settings import ConfigError, Settings, load_settings

DESCRIPTION = """\
Move Sidekiq jobs from Redis onto Celery queues, reliably.

Each job moves atomically from queue:<q> into this bridge's in-flight list, then into the
delivery ledger (before it is published), and is published as the Celery task gokiq.perform
(task id = jid, shown under the job's class); the ledger publishes it again if no worker
settles it in time. Due jobs in Sidekiq's retry and schedule sets are moved onto their queues.
A bridge that dies is recovered by any other bridge once its heartbeat expires. SIGTERM/SIGINT
stop cleanly: jobs still in the in-flight lists go back to their queues.

Settings come from defaults < the YAML file (--config or GOKIQ_CONFIG) < the environment
(REDIS_URL, CELERY_BROKER_URL, GOKIQ_QUEUES, GOKIQ_<SETTING>) < these flags. A bad setting
stops start-up with a message naming it, exit status 2."""

EPILOG = """\
examples:
  gokiq-bridge --queues "critical,3 default,1"     weighted, as sidekiq -q critical,3 -q default,1
  gokiq-bridge -q critical -q default --strict     always drain critical first
  gokiq-bridge --config gokiq.yml --metrics-port 0

HTTP (unless --metrics-port 0): /metrics (Prometheus), /health (alive), /ready (Redis and the
broker reachable: 200, else 503)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gokiq-bridge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", metavar="PATH", help="YAML settings file (default: $GOKIQ_CONFIG, if set)")
    add(
        "-q",
        "--queues",
        action="append",
        metavar="QUEUES",
        help='queues to drain, "name[,weight] ..." as Sidekiq\'s -q (repeatable); weights '
        "shuffle the order on every fetch in proportion; no weights means strict order "
        "(setting: queues, env GOKIQ_QUEUES; default: default)",
    )
    add(
        "--strict",
        action="store_true",
        default=None,
        help="always try the queues in the order given, ignoring weights (setting: strict)",
    )
    add("--redis-url", metavar="URL", help="Sidekiq's Redis (setting: redis_url, env REDIS_URL)")
    add(
        "--broker-url",
        metavar="URL",
        help="Celery broker, redis:// or amqp:// (setting: celery_broker_url, env "
        "CELERY_BROKER_URL; default: Sidekiq's Redis server, next db number)",
    )
    add(
        "--sidekiq-version",
        metavar="VERSION",
        help="the app's Sidekiq, 6, 7, 8 or e.g. 6.4.1: how enqueued_at is written (float "
        "seconds or integer ms); auto: as the sidecar publishes it, and until it has, due jobs "
        "wait in their sets (setting: sidekiq_version; default auto)",
    )
    add(
        "--batch-size",
        type=int,
        metavar="N",
        help="jobs fetched and published per round trip (setting: publish_batch_size; default 100)",
    )
    add(
        "--max-pending",
        type=int,
        metavar="N",
        help="hold a queue back while its Celery queue holds N messages or more; 0 means "
        "10 x worker_concurrency (setting: max_pending)",
    )
    add(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="how often the retry and schedule sets are polled (setting: "
        "scheduler_poll_interval; default 0.25)",
    )
    add(
        "--heartbeat-ttl",
        type=float,
        metavar="SECONDS",
        help="a bridge silent this long is dead and its jobs are given back "
        "(setting: bridge_heartbeat_ttl; default 30)",
    )
    add(
        "--recovery-interval",
        type=float,
        metavar="SECONDS",
        help="how often to look for dead bridges, besides at start "
        "(setting: bridge_recovery_interval; default 30)",
    )
    add(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="port of /metrics, /health, /ready; 0: do not serve (setting: "
        "bridge_metrics_port; default 9478)",
    )
    add(
        "--bind",
        metavar="ADDRESS",
        help="address of that server (setting: bridge_bind; default 127.0.0.1)",
    )
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, ... (setting: log_level)")
    add(
        "--log-format",
        choices=("json", "text"),
        help="json: one JSON object per line on stderr (setting: log_format; default json)",
    )
    return parser


# command-line option -> Settings field
_FLAG_FIELDS = {
    "queues": "queues",
    "strict": "strict",
    "redis_url": "redis_url",
    "broker_url": "celery_broker_url",
    "sidekiq_version": "sidekiq_version",
    "batch_size": "publish_batch_size",
    "max_pending": "max_pending",
    "poll_interval": "scheduler_poll_interval",
    "heartbeat_ttl": "bridge_heartbeat_ttl",
    "recovery_interval": "bridge_recovery_interval",
    "metrics_port": "bridge_metrics_port",
    "bind": "bridge_bind",
    "log_level": "log_level",
    "log_format": "log_format",
}


def settings_from_args(args: argparse.Namespace, environ=os.environ) -> Settings:
    overrides = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items()}
    if overrides["queues"] is not None:
        overrides["queues"] = " ".join(overrides["queues"])
    elif "GOKIQ_QUEUES" in environ and not environ["GOKIQ_QUEUES"].strip():
        # load_settings treats an empty variable as unset; for the queues that would silently
        # drain "default" when the operator meant something else.
        raise ConfigError("queues: GOKIQ_QUEUES is set but empty")
    return load_settings(args.config, environ, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"gokiq-bridge: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)

    from .runner import Bridge  # after logging is set up: importing Celery logs nothing early

    bridge = Bridge(settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: bridge.stop())
    try:
        return bridge.run()
    except ConfigError as exc:
        print(f"gokiq-bridge: bad setting: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
