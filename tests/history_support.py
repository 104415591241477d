"""Real databases for the job history's tests (and bench/history.py).

PostgreSQL: the server on 127.0.0.1:5432 when one answers with trust auth (as `postgres` or
`root`), else a throwaway cluster started with Debian's initdb/pg_ctl (`make deps` installs
the `postgresql` package). Either way each test module gets a database of its own, with a
unique name, dropped afterwards; nothing it did not create is touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _try_connect(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def local_server() -> str | None:
    """The admin URL of the server on 127.0.0.1:5432, if it lets us in."""
    for user in ("postgres", "root"):
        url = f"postgresql://{user}@127.0.0.1:5432/postgres"
        if _try_connect(url):
            return url
    return None


class PgCluster:
    """A throwaway PostgreSQL cluster in a temp dir of its own (run as `postgres` when we are
    root, since initdb refuses root, in a dir that user can reach). `stop()` and `start()`
    again: a database that goes down and comes back. `remove()` deletes it."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.fail("PostgreSQL is not installed: run `make deps`, which installs it")
        self.dir = Path(tempfile.mkdtemp(prefix="gokiq-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self.as_user, *argv], capture_output=True, text=True, cwd=self.dir, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> PgCluster:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: as a crash would (no checkpoint, connections cut)."""
        with contextlib.suppress(RuntimeError):  # not running
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def create_database(admin_url: str) -> str:
    """A new, empty database with a unique name; its URL."""
    name = f"gokiq_history_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    assert name.startswith("gokiq_history_")  # only what create_database made
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_admin() -> Iterator[str]:
    """The local server's admin URL, or a throwaway cluster's for as long as this lasts."""
    url = local_server()
    if url is not None:
        yield url
        return
    cluster = PgCluster().start()
    try:
        yield cluster.admin_url
    finally:
        cluster.remove()


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    url = create_database(admin_url)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with pg_admin() as url:
        yield url


@pytest.fixture(scope="module")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    with pg_database(pg_admin_url) as url:
        yield url
