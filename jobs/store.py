"""The job store: jobs, their state changes, metrics and base models, in one SQL database.

>>> store = JobStore()                                   # $PEFTFLEET_HOME/peftfleet.db   # doctest: +SKIP
>>> job = store.submit(spec)                             # PENDING, validated first        # doctest: +SKIP
>>> store.transition(job.id, JobState.QUEUED, reason="handed to Ray")                   # doctest: +SKIP
>>> store.adapters.list(base="minilm")                                                  # doctest: +SKIP

Any SQLAlchemy URL works: SQLite (the default; WAL mode, busy timeout, write transactions taken
with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing) or PostgreSQL for a
cluster (``postgresql+psycopg2://user@host/db``). Every state change goes through
:meth:`JobStore.transition`: it checks :data:`jobs.states.ALLOWED` and updates the row only if it
is still in the state it was read in (compare-and-swap), recording an event in the same
transaction.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import create_engine, event, func, inspect, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.adapter_registry import AdapterRegistry
from jobs.artifacts import ArtifactStorage
from jobs.base_models import resolve_base_model
from jobs.fingerprint import base_fingerprint
from jobs.home import peftfleet_home
from jobs.schema import SCHEMA_VERSION, Base, BaseModelRow, JobEventRow, JobRow, MetricRow, SchemaInfo
from jobs.spec import JobSpec, parse_job_spec
from jobs.states import IllegalTransition, JobState, check_transition
from jobs.subspace_registry import SubspaceRegistry
from jobs.sweeps import SweepRegistry

SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreVersionError(RuntimeError):
    """The database was written by a newer peftfleet whose schema this one does not know."""


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different spec."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: JobState
    spec: dict[str, Any]
    base_model: str
    task_name: str
    method: str
    idempotency_key: str | None
    owner: str | None
    heartbeat_at: float | None
    attempt: int
    runtime: dict[str, Any]
    error: str | None
    traceback: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def job_spec(self) -> JobSpec:  # type: ignore[valid-type]
        return parse_job_spec(self.spec)

    @classmethod
    def _from_row(cls, row: JobRow) -> JobRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["state"] = JobState(row.state)
        values["runtime"] = dict(row.runtime or {})
        return cls(**values)


@dataclass(frozen=True)
class JobEvent:
    at: float
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True)
class Metric:
    step: int
    name: str
    value: float
    at: float


@dataclass(frozen=True)
class BaseModelRecord:
    fingerprint: str
    name: str
    path: str
    model_type: str | None
    created_at: float


def default_store_url(home: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{peftfleet_home(home) / 'peftfleet.db'}"


def _make_engine(url: str):
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver stays out of the way; `_on_begin` opens transactions
        for pragma in (f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A deferred transaction that later writes can fail with SQLITE_BUSY without waiting;
        # taking the write lock up front makes concurrent writers queue on the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("peftfleet_write") else "BEGIN")

    return engine


class JobStore:
    """Jobs, events, metrics, base models and (``store.adapters``) the adapter registry."""

    def __init__(
        self,
        url: str | None = None,
        *,
        storage_url: str | os.PathLike | None = None,
        home: str | os.PathLike | None = None,
    ):
        self.home = home
        self.url = url or os.environ.get("PEFTFLEET_STORE_URL") or default_store_url(home)
        self.engine = _make_engine(self.url)
        self._ensure_schema()
        self.artifacts = ArtifactStorage(storage_url or os.environ.get("PEFTFLEET_STORAGE_URL"), home=home)
        self.adapters = AdapterRegistry(self)
        self.subspaces = SubspaceRegistry(self)
        self.sweeps = SweepRegistry(self)

    def close(self) -> None:
        self.engine.dispose()

    # -- sessions --------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self.engine.execution_options(peftfleet_write=True), expire_on_commit=False) as session:
            with session.begin():
                yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def _ensure_schema(self) -> None:
        with self._write() as s:
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

    def schema_version(self) -> int:
        with self._read() as s:
            return s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> JobRecord:
        """Validate and store a job as PENDING. A repeated idempotency key returns the first job.

        Raises ``JobSpecError`` (nothing stored) or ``IdempotencyConflict`` (key used for another spec).
        """
        spec = parse_job_spec(spec)
        if idempotency_key is not None:
            if spec.idempotency_key not in (None, idempotency_key):
                raise IdempotencyConflict(f"idempotency_key {idempotency_key!r} differs from the spec's {spec.idempotency_key!r}")
            spec = spec.model_copy(update={"idempotency_key": idempotency_key})
        payload = spec.model_dump(mode="json")
        key = spec.idempotency_key
        now = time.time()
        try:
            with self._write() as s:
                if key is not None:
                    existing = s.scalar(select(JobRow).where(JobRow.idempotency_key == key))
                    if existing is not None:
                        return _same_submission(existing, payload)
                row = JobRow(
                    id=uuid.uuid4().hex, name=spec.name, state=JobState.PENDING.value, spec=payload,
                    base_model=spec.base_model, task_name=spec.effective_task_name, method=spec.method_name,
                    idempotency_key=key, attempt=0, runtime={}, created_at=now, updated_at=now,
                )
                s.add(row)
                s.flush()  # the job row first: the event references it
                s.add(JobEventRow(job_id=row.id, at=now, from_state=None, to_state=JobState.PENDING.value, reason="submitted"))
            return JobRecord._from_row(row)
        except IntegrityError:
            if key is None:
                raise
            with self._read() as s:  # another process inserted this key between our read and write
                existing = s.scalar(select(JobRow).where(JobRow.idempotency_key == key))
            if existing is None:
                raise
            return _same_submission(existing, payload)

    def get(self, job_id: str) -> JobRecord:
        """A job by id, or by a unique prefix of at least 6 characters."""
        with self._read() as s:
            row = s.get(JobRow, job_id)
            if row is None and len(job_id) >= 6:
                matches = s.scalars(select(JobRow).where(JobRow.id.startswith(job_id, autoescape=True)).limit(2)).all()
                if len(matches) > 1:
                    raise JobNotFound(f"job id prefix {job_id!r} is ambiguous")
                row = matches[0] if matches else None
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.url}")
            return JobRecord._from_row(row)

    def list_jobs(
        self, *, state: JobState | str | Iterable[JobState | str] | None = None, name: str | None = None,
        task_name: str | None = None, limit: int | None = 100,
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally filtered."""
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id)
        if state is not None:
            states = [state] if isinstance(state, (str, JobState)) else list(state)
            query = query.where(JobRow.state.in_([JobState(s).value for s in states]))
        if name is not None:
            query = query.where(JobRow.name == name)
        if task_name is not None:
            query = query.where(JobRow.task_name == task_name)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as s:
            return [JobRecord._from_row(r) for r in s.scalars(query)]

    def count_jobs(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(JobRow))

    def transition(
        self, job_id: str, to: JobState | str, *, reason: str = "", expected: Iterable[JobState] | None = None,
        error: str | None = None, traceback: str | None = None, owner: str | None = None,
    ) -> JobRecord:
        """Move a job to ``to`` if the table allows it and nobody moved it first; record the event.

        ``expected`` narrows the states the caller believes the job is in. Raises
        :class:`IllegalTransition` (forbidden, terminal, or lost a race) or :class:`JobNotFound`.
        """
        to = JobState(to)
        now = time.time()
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.url}")
            current = JobState(row.state)
            if expected is not None and current not in set(expected):
                raise IllegalTransition(job_id, current, to, f" (expected it in {sorted(str(e) for e in expected)})")
            check_transition(job_id, current, to)
            values: dict[str, Any] = {"state": to.value, "updated_at": now}
            if to is JobState.RUNNING and row.started_at is None:
                values["started_at"] = now
            if to.is_terminal:
                values["finished_at"] = now
            if to is JobState.RETRYING:
                values["attempt"] = row.attempt + 1
            for column, value in (("error", error), ("traceback", traceback), ("owner", owner)):
                if value is not None:
                    values[column] = value
            result = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == current.value).values(**values)
            )
            if result.rowcount != 1:
                raise IllegalTransition(job_id, current, to, " (the job changed state concurrently)")
            s.add(JobEventRow(job_id=job_id, at=now, from_state=current.value, to_state=to.value, reason=reason or ""))
        return self.get(job_id)

    def heartbeat(self, job_id: str, owner: str) -> bool:
        """Record that ``owner`` is alive and still running ``job_id``; False once the job is settled."""
        with self._write() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state.notin_([st.value for st in JobState if st.is_terminal]))
                .values(heartbeat_at=time.time(), owner=owner)
            )
            return result.rowcount == 1

    def set_runtime(self, job_id: str, **info: Any) -> JobRecord:
        """Record where a job runs (merged into ``runtime``), e.g. its Ray submission id."""
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.url}")
            row.runtime = {**(row.runtime or {}), **info}
            row.updated_at = time.time()
        return self.get(job_id)

    def events(self, job_id: str) -> list[JobEvent]:
        with self._read() as s:
            rows = s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id))
            return [
                JobEvent(r.at, JobState(r.from_state) if r.from_state else None, JobState(r.to_state), r.reason)
                for r in rows
            ]

    # -- metrics ---------------------------------------------------------------------------
    def record_metrics(self, job_id: str, step: int, values: dict[str, float]) -> None:
        now = time.time()
        try:
            with self._write() as s:
                s.add_all(MetricRow(job_id=job_id, step=step, name=k, value=float(v), at=now) for k, v in values.items())
        except IntegrityError:
            raise JobNotFound(f"no job {job_id!r} in {self.url}") from None

    def metrics(self, job_id: str, name: str | None = None) -> list[Metric]:
        query = select(MetricRow).where(MetricRow.job_id == job_id).order_by(MetricRow.step, MetricRow.id)
        if name is not None:
            query = query.where(MetricRow.name == name)
        with self._read() as s:
            return [Metric(r.step, r.name, r.value, r.at) for r in s.scalars(query)]

    # -- base models -----------------------------------------------------------------------
    def register_base_model(self, ref: str) -> BaseModelRecord:
        """Register a base model once (by fingerprint); later calls return the same record."""
        path = resolve_base_model(ref, home=self.home)
        fingerprint = base_fingerprint(path, home=self.home)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        try:
            with self._write() as s:
                row = s.get(BaseModelRow, fingerprint)
                if row is None:
                    row = BaseModelRow(fingerprint=fingerprint, name=ref, path=str(path), model_type=model_type, created_at=time.time())
                    s.add(row)
        except IntegrityError:  # registered concurrently by another process
            pass
        return self.get_base_model(fingerprint)

    def get_base_model(self, fingerprint_or_name: str) -> BaseModelRecord:
        with self._read() as s:
            row = s.get(BaseModelRow, fingerprint_or_name) or s.scalar(
                select(BaseModelRow).where(BaseModelRow.name == fingerprint_or_name).order_by(BaseModelRow.created_at.desc()).limit(1)
            )
            if row is None:
                raise KeyError(f"no base model {fingerprint_or_name!r} is registered")
            return BaseModelRecord(row.fingerprint, row.name, row.path, row.model_type, row.created_at)

    def list_base_models(self) -> list[BaseModelRecord]:
        with self._read() as s:
            rows = s.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at))
            return [BaseModelRecord(r.fingerprint, r.name, r.path, r.model_type, r.created_at) for r in rows]


def _same_submission(existing: JobRow, payload: dict[str, Any]) -> JobRecord:
    if existing.spec != payload:
        raise IdempotencyConflict(
            f"idempotency key {existing.idempotency_key!r} was already used for job {existing.id} with a different spec"
        )
    return JobRecord._from_row(existing)
