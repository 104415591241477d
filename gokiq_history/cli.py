"""`gokiq-history`: manage the job history's database (`migrate`, `current`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gokiq_celery.logs import setup_logging
from gokiq_celery.settings import ConfigError, load_settings

EPILOG = """\
examples:
  GOKIQ_HISTORY_URL=postgresql://gokiq@db/gokiq gokiq-history migrate
  gokiq-history --url sqlite:///.run/history.sqlite3 migrate
  gokiq-history current      prints the applied revision ("none": never migrated)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gokiq-history",
        description="The job history's database: apply migrations, show the applied revision.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML settings file")
    parser.add_argument(
        "--url", metavar="URL", help="the database (setting: history_url, env GOKIQ_HISTORY_URL)"
    )
    parser.add_argument("command", choices=["migrate", "current"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, history_url=args.url)
    except ConfigError as exc:
        print(f"gokiq-history: bad setting: {exc}", file=sys.stderr)
        return 2
    if not settings.history_url:
        print("gokiq-history: history_url is empty (GOKIQ_HISTORY_URL or --url)", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from . import migrations

    if args.command == "migrate":
        migrations.upgrade(settings.history_url)
    print(migrations.current(settings.history_url) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
