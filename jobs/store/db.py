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
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from jobs.home import peftfleet_home
from jobs.store.schema import SCHEMA_VERSION, Base, SchemaInfo

SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(RuntimeError):
    """The store cannot be used as it is (unreadable, not a peftfleet store, wrong schema version); the
    message is one line saying what to do."""


class StoreVersionError(StoreError):
    """The database's schema is not this peftfleet's: newer (upgrade peftfleet), older (run
    ``peftfleet db upgrade``), or missing."""


def redact_url(text: str) -> str:
    """``text`` (a store URL, or a message that may hold one) with every URL password replaced by
    ``***``: the only form of a store URL that may appear in a message, a log line or a record."""
    return _PASSWORD.sub(r"\1***@", str(text))


_PASSWORD = re.compile(r"(://[^\s/:@]*:)[^\s/@]*@")


def default_store_url(home: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{peftfleet_home(home) / 'peftfleet.db'}"


class Database:
    """An engine plus the two kinds of transaction every store module uses: ``read()`` and ``write()``.

    Opening never changes an existing schema: a store of an older schema version is refused until
    :meth:`upgrade` (``peftfleet db upgrade``) migrates it, unless ``auto_upgrade`` is set."""

    def __init__(self, url: str, *, auto_upgrade: bool = False, check: bool = True):
        self.url = url
        self.engine = _make_engine(url)
        try:
            if check:  # only `peftfleet db upgrade` opens without the check, to run upgrade()
                self._check_schema(auto_upgrade)
        except DBAPIError as e:  # unreadable: corrupt file, wrong server, no permission
            self.engine.dispose()
            first = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
            raise StoreError(f"cannot open the store at {redact_url(url)}: {redact_url(first)}") from None
        except BaseException:
            self.engine.dispose()
            raise

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

    def upgrade(self) -> tuple[int, int]:
        """Migrate the schema to this peftfleet's version; returns (from, to). Back the database up first."""
        with self.write() as s:
            conn = s.connection()
            _lock(conn)
            version = _read_version(conn, s, self.url)
            if version > SCHEMA_VERSION:
                raise _newer(self.url, version)
            if version < SCHEMA_VERSION:
                # Migrations add tables (create_all skips existing ones) and columns (below).
                Base.metadata.create_all(conn)
                if "owner" not in {c["name"] for c in inspect(conn).get_columns("job_events")}:  # 4
                    conn.execute(text("ALTER TABLE job_events ADD COLUMN owner VARCHAR(200)"))
                if "source" not in {c["name"] for c in inspect(conn).get_columns("base_models")}:  # 5
                    conn.execute(text("ALTER TABLE base_models ADD COLUMN source JSON"))
                s.execute(update(SchemaInfo).where(SchemaInfo.id == 1).values(version=SCHEMA_VERSION))
            return version, SCHEMA_VERSION

    def _check_schema(self, auto_upgrade: bool) -> None:
        with self.write() as s:
            conn = s.connection()
            _lock(conn)
            tables = inspect(conn).get_table_names()
            if not tables:  # a new store
                Base.metadata.create_all(conn)
                s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
                return
            version = _read_version(conn, s, self.url)
        if version > SCHEMA_VERSION:
            raise _newer(self.url, version)
        if version < SCHEMA_VERSION:
            if not auto_upgrade:
                raise StoreVersionError(
                    f"the store at {redact_url(self.url)} has schema version {version}; this peftfleet uses "
                    f"{SCHEMA_VERSION}: back it up, then run `peftfleet db upgrade` (or open it with auto_upgrade=True)"
                )
            self.upgrade()


def _lock(conn) -> None:
    if conn.dialect.name == "postgresql":  # serialise concurrent first opens and upgrades
        conn.execute(text("SELECT pg_advisory_xact_lock(7412093)"))


def _read_version(conn, s: Session, url: str) -> int:
    if not inspect(conn).has_table(SchemaInfo.__tablename__):
        raise StoreError(f"the database at {redact_url(url)} has tables but is not a peftfleet store")
    version = s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))
    if not isinstance(version, int) or version < 1:
        raise StoreVersionError(
            f"the store at {redact_url(url)} records no schema version ({version!r}): it is damaged; "
            "restore it from a backup"
        )
    return version


def _newer(url: str, version: int) -> StoreVersionError:
    return StoreVersionError(
        f"the store at {redact_url(url)} has schema version {version}, written by a newer peftfleet; "
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
