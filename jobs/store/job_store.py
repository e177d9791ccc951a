"""The job store: jobs, their state changes and metrics, with the registries beside them.

>>> store = JobStore()                                   # $PEFTFLEET_HOME/peftfleet.db   # doctest: +SKIP
>>> job = store.submit(spec)                             # PENDING, validated first        # doctest: +SKIP
>>> store.transition(job.id, JobState.QUEUED, reason="handed to Ray")                   # doctest: +SKIP
>>> store.adapters.list(base="minilm")                                                  # doctest: +SKIP

It sits on one :class:`jobs.store.db.Database` (SQLite by default, any SQLAlchemy URL) and builds
the registries on the same database and artifact storage. Every state change goes through
:meth:`JobStore.transition`: it checks :data:`jobs.states.ALLOWED` and updates the row only if it
is still in the state it was read in (compare-and-swap), recording an event in the same
transaction.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.secrets import store_url as store_url_from_env
from jobs.spec import parse_job_spec
from jobs.states import IllegalTransition, JobState, check_transition
from jobs.store.adapter_registry import AdapterRegistry
from jobs.store.artifacts import ArtifactStorage
from jobs.store.base_model_registry import BaseModelRecord, BaseModelRegistry
from jobs.store.checkpoint_registry import CheckpointRegistry
from jobs.store.db import Database, default_store_url, redact_url
from jobs.store.records import IdempotencyConflict, JobEvent, JobNotFound, JobRecord, Metric, OwnershipLost
from jobs.store.schema import JobEventRow, JobRow, MetricRow
from jobs.store.subspace_registry import SubspaceRegistry
from jobs.store.sweep_registry import SweepRegistry


class JobStore:
    """Jobs, events and metrics; ``store.base_models``, ``store.adapters``, ``store.subspaces``,
    ``store.sweeps`` and ``store.checkpoints`` are the registries on the same database."""

    def __init__(
        self,
        url: str | None = None,
        *,
        storage_url: str | os.PathLike | None = None,
        home: str | os.PathLike | None = None,
        auto_upgrade: bool | None = None,
    ):
        self.home = home
        self.url = url or store_url_from_env() or default_store_url(home)
        if auto_upgrade is None:  # a deployment may opt in for the processes it starts
            auto_upgrade = os.environ.get("PEFTFLEET_STORE_AUTO_UPGRADE", "0") == "1"
        self.db = Database(self.url, auto_upgrade=auto_upgrade)
        self.artifacts = ArtifactStorage(storage_url or os.environ.get("PEFTFLEET_STORAGE_URL"), home=home)
        self.base_models = BaseModelRegistry(self.db, home=home)
        self.adapters = AdapterRegistry(self.db, self.artifacts, self.base_models)
        self.subspaces = SubspaceRegistry(self.db, self.artifacts, self.base_models)
        self.sweeps = SweepRegistry(self.db)
        self.checkpoints = CheckpointRegistry(self.db)

    def close(self) -> None:
        self.db.close()

    def schema_version(self) -> int:
        return self.db.schema_version()

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> JobRecord:
        """Validate and store a job as PENDING. A repeated idempotency key returns the first job.

        Raises ``JobSpecError`` (nothing stored) or ``IdempotencyConflict`` (key used for another spec).
        """
        spec = parse_job_spec(spec)
        if idempotency_key is not None:
            if spec.idempotency_key not in (None, idempotency_key):
                raise IdempotencyConflict(
                    f"idempotency_key {idempotency_key!r} differs from the spec's {spec.idempotency_key!r}"
                )
            spec = spec.model_copy(update={"idempotency_key": idempotency_key})
        payload = spec.model_dump(mode="json")
        key = spec.idempotency_key
        now = time.time()
        try:
            with self.db.write() as s:
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
                s.add(
                    JobEventRow(
                        job_id=row.id, at=now, from_state=None, to_state=JobState.PENDING.value, reason="submitted"
                    )
                )
            return JobRecord.from_row(row)
        except IntegrityError:
            if key is None:
                raise
            with self.db.read() as s:  # another process inserted this key between our read and write
                existing = s.scalar(select(JobRow).where(JobRow.idempotency_key == key))
            if existing is None:
                raise
            return _same_submission(existing, payload)

    def get(self, job_id: str) -> JobRecord:
        """A job by id, or by a unique prefix of at least 6 characters."""
        with self.db.read() as s:
            row = s.get(JobRow, job_id)
            if row is None and len(job_id) >= 6:
                matches = s.scalars(select(JobRow).where(JobRow.id.startswith(job_id, autoescape=True)).limit(2)).all()
                if len(matches) > 1:
                    raise JobNotFound(f"job id prefix {job_id!r} is ambiguous")
                row = matches[0] if matches else None
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}")
            return JobRecord.from_row(row)

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
        with self.db.read() as s:
            return [JobRecord.from_row(r) for r in s.scalars(query)]

    def count_jobs(self) -> int:
        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(JobRow))

    def transition(
        self, job_id: str, to: JobState | str, *, reason: str = "", expected: Iterable[JobState] | None = None,
        error: str | None = None, traceback: str | None = None, as_owner: str | None = None, release: bool = False,
    ) -> JobRecord:
        """Move a job to ``to`` if the table allows it and nobody moved it first; record the event.

        ``expected`` narrows the states the caller believes the job is in; ``as_owner`` makes the change
        only if that owner still holds the job (else :class:`OwnershipLost`); ``release`` clears the
        owner (the job is handed back: a new runner may claim it). Raises :class:`IllegalTransition`
        (forbidden, terminal, or lost a race) or :class:`JobNotFound`.
        """
        with self.db.write() as s:
            self.transition_in(s, job_id, to, reason=reason, expected=expected, error=error, traceback=traceback,
                               as_owner=as_owner, release=release)
        return self.get(job_id)

    def transition_in(
        self, s: Session, job_id: str, to: JobState | str, *, reason: str = "",
        expected: Iterable[JobState] | None = None, error: str | None = None, traceback: str | None = None,
        as_owner: str | None = None, release: bool = False, owner: str | None = None,
    ) -> None:
        """:meth:`transition` inside the caller's write transaction ``s`` (e.g. with an adapter's
        registration, so both land or neither); ``owner`` sets a new owner (a claim)."""
        to = JobState(to)
        now = time.time()
        row = s.get(JobRow, job_id)
        if row is None:
            raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}")
        current = JobState(row.state)
        if as_owner is not None and row.owner != as_owner:
            raise OwnershipLost(f"job {job_id} is {current} and owned by {row.owner or 'nobody'}, not {as_owner}")
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
        if release:
            values["owner"] = None
        result = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state == current.value, JobRow.attempt == row.attempt,
                   JobRow.owner == row.owner if row.owner is not None else JobRow.owner.is_(None))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise IllegalTransition(job_id, current, to, " (the job changed state concurrently)")
        s.add(JobEventRow(job_id=job_id, at=now, from_state=current.value, to_state=to.value, reason=reason or "",
                          owner=values.get("owner", row.owner)))

    def claim(self, job_id: str, owner: str, *, reason: str) -> JobRecord:
        """Become the one owner of a job's current attempt: PENDING or RETRYING (owner cleared, or already
        ``owner``) → QUEUED with ``owner`` set, by compare-and-swap on (state, owner, attempt). A job its
        owner already holds is returned as it is; a CANCELLING job nobody holds is settled CANCELLED; a
        settled job is returned unchanged (a resubmit after success finds it done).

        Raises :class:`OwnershipLost` when another owner holds it.
        """
        with self.db.write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}")
            state = JobState(row.state)
            if state.is_terminal:
                pass
            elif row.owner not in (None, owner):
                raise OwnershipLost(f"job {job_id} ({state}, attempt {row.attempt}) is owned by {row.owner}, "
                                    f"not {owner}")
            elif state is JobState.CANCELLING and row.owner is None:
                self.transition_in(s, job_id, JobState.CANCELLED, reason="cancelled before its runner started")
            elif state in (JobState.PENDING, JobState.RETRYING):
                self.transition_in(s, job_id, JobState.QUEUED, reason=reason, owner=owner)
                s.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=time.time())
                          .execution_options(synchronize_session=False))
            elif row.owner is None:  # QUEUED or RUNNING with no owner: nobody may run it without a claim
                raise OwnershipLost(f"job {job_id} is {state} with no owner; hand it back before running it again")
        return self.get(job_id)

    def release(self, job_id: str, *, owner: str | None, reason: str) -> JobRecord:
        """Hand a RETRYING job back with no owner and a new attempt, if ``owner`` still holds it (what a
        reconciler does before starting a new runner for a job whose runner died while retrying)."""
        now = time.time()
        with self.db.write() as s:
            owned = JobRow.owner == owner if owner is not None else JobRow.owner.is_(None)
            result = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == JobState.RETRYING.value, owned)
                .values(owner=None, attempt=JobRow.attempt + 1, updated_at=now)
            )
            if result.rowcount != 1:
                raise OwnershipLost(f"job {job_id} is no longer RETRYING under {owner or 'nobody'}")
            s.add(JobEventRow(job_id=job_id, at=now, from_state=JobState.RETRYING.value,
                              to_state=JobState.RETRYING.value, reason=reason, owner=None))
        return self.get(job_id)

    def heartbeat(self, job_id: str, owner: str) -> bool:
        """Record that ``owner`` is alive and still running ``job_id``; False once the job is settled or
        someone else owns it (the caller must then stop its work)."""
        with self.db.write() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.owner == owner,
                       JobRow.state.notin_([st.value for st in JobState if st.is_terminal]))
                .values(heartbeat_at=time.time())
            )
            return result.rowcount == 1

    def keep_alive(self, job_ids: list[str]) -> None:
        """Record a sign of life for live jobs whose training someone other than their runner holds (a
        base group), leaving their owner as it is; settled jobs are left alone."""
        if not job_ids:
            return
        with self.db.write() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(job_ids), JobRow.state.notin_([st.value for st in JobState if st.is_terminal]))
                .values(heartbeat_at=time.time())
            )

    def set_runtime(self, job_id: str, **info: Any) -> JobRecord:
        """Record where a job runs (merged into ``runtime``), e.g. its Ray submission id. The row is
        locked while merging, so concurrent updates of different keys all land."""
        with self.db.write() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}")
            row.runtime = {**(row.runtime or {}), **info}
            row.updated_at = time.time()
        return self.get(job_id)

    def claim_launch(self, job_id: str, submission_id: str, **info: Any) -> bool:
        """Record ``submission_id`` as the job's Ray submission if the job is PENDING and has none yet;
        True for the one caller that may launch it (two submits with one idempotency key, or a submit
        racing a cancel, launch at most once)."""
        with self.db.write() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}")
            runtime = dict(row.runtime or {})
            if row.state != JobState.PENDING.value or runtime.get("ray_submission_id"):
                return False
            row.runtime = {**runtime, "ray_submission_id": submission_id, **info}
            row.updated_at = time.time()
            return True

    def events(self, job_id: str) -> list[JobEvent]:
        with self.db.read() as s:
            rows = s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id))
            return [
                JobEvent(r.at, JobState(r.from_state) if r.from_state else None, JobState(r.to_state), r.reason,
                         r.owner)
                for r in rows
            ]

    # -- metrics ---------------------------------------------------------------------------
    def record_metrics(self, job_id: str, step: int, values: dict[str, float], *, owner: str | None = None) -> None:
        """Record metric values at ``step``; with ``owner``, only while that owner holds the live job
        (else :class:`OwnershipLost`: a runner that lost its job writes nothing more)."""
        now = time.time()
        try:
            with self.db.write() as s:
                if owner is not None:
                    row = s.get(JobRow, job_id)
                    if row is not None and (row.owner != owner or JobState(row.state).is_terminal):
                        raise OwnershipLost(f"job {job_id} is {row.state} and owned by {row.owner or 'nobody'}, "
                                            f"not {owner}: metrics refused")
                s.add_all(
                    MetricRow(job_id=job_id, step=step, name=k, value=float(v), at=now) for k, v in values.items()
                )
        except IntegrityError:
            raise JobNotFound(f"no job {job_id!r} in {redact_url(self.url)}") from None

    def metrics(self, job_id: str, name: str | None = None) -> list[Metric]:
        query = select(MetricRow).where(MetricRow.job_id == job_id).order_by(MetricRow.step, MetricRow.id)
        if name is not None:
            query = query.where(MetricRow.name == name)
        with self.db.read() as s:
            return [Metric(r.step, r.name, r.value, r.at) for r in s.scalars(query)]

    # -- base models (kept here for callers that hold only a store) -----------------------
    def register_base_model(self, ref: str) -> BaseModelRecord:
        return self.base_models.register(ref)

    def get_base_model(self, fingerprint_or_name: str) -> BaseModelRecord:
        return self.base_models.get(fingerprint_or_name)

    def list_base_models(self) -> list[BaseModelRecord]:
        return self.base_models.list()


def _same_submission(existing: JobRow, payload: dict[str, Any]) -> JobRecord:
    if existing.spec != payload:
        raise IdempotencyConflict(
            f"idempotency key {existing.idempotency_key!r} was already used for job {existing.id} with a different spec"
        )
    return JobRecord.from_row(existing)
