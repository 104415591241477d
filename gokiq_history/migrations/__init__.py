"""Alembic migrations of the history tables, shipped with the package.

`upgrade(url)` applies every migration not yet applied (`gokiq-history migrate`, or at start-up
with `history_migrate`). On PostgreSQL an advisory lock (in env.py) lets several processes
start at once: the first migrates, the others wait and find nothing left to do.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
VERSION_TABLE = "gokiq_history_version"


def _config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_config(url), revision)


def head() -> str:
    """The newest revision shipped with this package (what `upgrade` brings a database to)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("")).get_current_head()


def current(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    from ..store import open_engine

    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()
