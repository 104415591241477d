"""Alembic's entry point: runs the migrations on the URL `upgrade()` passed in."""

from alembic import context
from sqlalchemy import text

from gokiq_history.migrations import VERSION_TABLE
from gokiq_history.store import open_engine

# Any fixed number: the key of PostgreSQL's advisory lock that serialises migrations.
_LOCK_KEY = 0x60C1_4157


def run_migrations_online() -> None:
    engine = open_engine(context.config.attributes["url"], statement_timeout=300)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
                connection.commit()
            context.configure(connection=connection, version_table=VERSION_TABLE)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()  # the session's advisory lock goes with the connection


run_migrations_online()
