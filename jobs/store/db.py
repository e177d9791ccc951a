"""The persistence floor: one SQL database, its sessions and its schema check.

Any SQLAlchemy URL works: SQLite (the default; WAL mode, busy timeout, write transactions taken
with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing) or PostgreSQL for a
cluster (``postgresql+psycopg2://user@host/db``). The job store and every registry sit on one
:class:`Database`; none of them reaches into another's sessions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, inspect, select, text, update
from sqlalchemy.orm import Session

from jobs.home import peftfleet_home
from jobs.store.schema import SCHEMA_VERSION, Base, SchemaInfo

SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreVersionError(RuntimeError):
    """The database was written by a newer peftfleet whose schema this one does not know."""


def redact_url(text: str) -> str:
    """``text`` (a store URL, or a message that may hold one) with every URL password replaced by
    ``***``: the only form of a store URL that may appear in a message, a log line or a record."""
    return _PASSWORD.sub(r"\1***@", str(text))


_PASSWORD = re.compile(r"(://[^\s/:@]*:)[^\s/@]*@")


def default_store_url(home: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{peftfleet_home(home) / 'peftfleet.db'}"


class Database:
    """An engine plus the two kinds of transaction every store module uses: ``read()`` and ``write()``."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _make_engine(url)
        self._ensure_schema()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that will write (on SQLite it takes the write lock up front)."""
        with Session(self.engine.execution_options(peftfleet_write=True), expire_on_commit=False) as session:
            with session.begin():
                yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def schema_version(self) -> int:
        with self.read() as s:
            return s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))

    def close(self) -> None:
        self.engine.dispose()

    def _ensure_schema(self) -> None:
        with self.write() as s:
            conn = s.connection()
            if conn.dialect.name == "postgresql":  # serialise concurrent first opens
                conn.execute(text("SELECT pg_advisory_xact_lock(7412093)"))
            if not inspect(conn).has_table(SchemaInfo.__tablename__):
                Base.metadata.create_all(conn)
                s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
                return
            version = s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))
            if version is not None and version < SCHEMA_VERSION:
                # Every migration so far only adds tables, which create_all does (it skips existing ones).
                Base.metadata.create_all(conn)
                s.execute(update(SchemaInfo).where(SchemaInfo.id == 1).values(version=SCHEMA_VERSION))
                return
        if version is None or version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"the store at {self.url} has schema version {version}, written by a newer peftfleet; "
                f"this peftfleet understands up to version {SCHEMA_VERSION} — upgrade peftfleet"
            )


def _make_engine(url: str):
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver stays out of the way; `_on_begin` opens transactions
        for pragma in (
            f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "foreign_keys=ON",
        ):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A deferred transaction that later writes can fail with SQLITE_BUSY without waiting;
        # taking the write lock up front makes concurrent writers queue on the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("peftfleet_write") else "BEGIN")

    return engine
