"""The sweep registry: a hyper-parameter search, its trials (each a job in the store) and its best one."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from jobs.store.db import Database
from jobs.store.records import JobRecord, NotFound
from jobs.store.schema import JobRow, SweepRow, SweepTrialRow
from jobs.sweep_spec import SweepSpec, parse_sweep_spec

SWEEP_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "INTERRUPTED")
LIVE_SWEEP = ("PENDING", "RUNNING")


class SweepNotFound(NotFound):
    pass


class SweepChanged(RuntimeError):
    """A sweep was not in the state (or under the driver) the caller expected: someone else moved it."""


@dataclass(frozen=True)
class SweepRecord:
    id: str
    name: str
    state: str
    spec: dict[str, Any]
    metric: str
    mode: str
    scheduler: str
    experiment_path: str | None
    runtime: dict[str, Any]
    best_job_id: str | None
    best_adapter: str | None
    best_value: float | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    @property
    def sweep_spec(self) -> SweepSpec:
        return parse_sweep_spec(self.spec)


@dataclass(frozen=True)
class Trial:
    trial_id: str
    params: dict[str, Any]
    job: JobRecord


class SweepRegistry:
    def __init__(self, db: Database):
        self.db = db

    def create(self, sweep: SweepSpec) -> SweepRecord:
        now = time.time()
        row = SweepRow(
            id=uuid.uuid4().hex,
            name=sweep.name,
            state="PENDING",
            spec=sweep.model_dump(mode="json"),
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=sweep.scheduler,
            runtime={},
            created_at=now,
            updated_at=now,
        )
        with self.db.write() as s:
            s.add(row)
        return _record(row)

    def get(self, sweep_id: str) -> SweepRecord:
        """A sweep by id, unique id prefix (6+ characters) or name (the newest of that name)."""
        with self.db.read() as s:
            row = s.get(SweepRow, sweep_id)
            if row is None and len(sweep_id) >= 6:
                rows = s.scalars(
                    select(SweepRow).where(SweepRow.id.startswith(sweep_id, autoescape=True)).limit(2)
                ).all()
                row = rows[0] if len(rows) == 1 else None
            if row is None:
                row = s.scalar(
                    select(SweepRow).where(SweepRow.name == sweep_id).order_by(SweepRow.created_at.desc()).limit(1)
                )
            if row is None:
                raise SweepNotFound(f"no sweep {sweep_id!r}")
            return _record(row)

    def list(self, *, limit: int | None = 50) -> list[SweepRecord]:
        query = select(SweepRow).order_by(SweepRow.created_at.desc(), SweepRow.id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as s:
            return [_record(r) for r in s.scalars(query)]

    def update(self, sweep_id: str, *, expected: tuple[str, ...] | None = None, driver: str | None = None,
               **fields: Any) -> SweepRecord:
        """Change a sweep's fields. ``expected``: only while it is in one of these states; ``driver``: only
        while that Ray submission is its driver (compare-and-swap under a row lock): otherwise
        :class:`SweepChanged` and nothing is written (two resumes start one driver; a settled sweep
        stays settled)."""
        if "state" in fields and fields["state"] not in SWEEP_STATES:
            raise ValueError(f"unknown sweep state {fields['state']!r}")
        now = time.time()
        if fields.get("state") in ("SUCCEEDED", "FAILED", "INTERRUPTED"):
            fields.setdefault("finished_at", now)
        with self.db.write() as s:
            row = s.scalar(select(SweepRow).where(SweepRow.id == sweep_id).with_for_update())
            if row is None:
                raise SweepNotFound(f"no sweep {sweep_id!r}")
            if expected is not None and row.state not in expected:
                raise SweepChanged(f"sweep {sweep_id[:8]} is {row.state}, not {' or '.join(expected)}")
            current_driver = (row.runtime or {}).get("ray_submission_id")
            if driver is not None and current_driver != driver:
                raise SweepChanged(f"sweep {sweep_id[:8]} is driven by {current_driver}, not {driver}")
            s.execute(update(SweepRow).where(SweepRow.id == sweep_id).values(**fields, updated_at=now))
        return self.get(sweep_id)

    def add_trial(self, sweep_id: str, job_id: str, trial_id: str, params: dict[str, Any]) -> None:
        """Link a trial's job to the sweep (again after a restore: then nothing changes)."""
        try:
            with self.db.write() as s:
                if s.get(SweepTrialRow, (sweep_id, job_id)) is None:
                    s.add(
                        SweepTrialRow(
                            sweep_id=sweep_id, job_id=job_id, trial_id=trial_id, params=params, created_at=time.time()
                        )
                    )
        except IntegrityError:
            pass

    def trials(self, sweep_id: str) -> list[Trial]:
        with self.db.read() as s:
            rows = s.execute(
                select(SweepTrialRow, JobRow).join(JobRow, JobRow.id == SweepTrialRow.job_id)
                .where(SweepTrialRow.sweep_id == sweep_id).order_by(JobRow.name)
            ).all()
            return [Trial(t.trial_id, dict(t.params), JobRecord.from_row(j)) for t, j in rows]


def _record(r: SweepRow) -> SweepRecord:
    return SweepRecord(
        r.id,
        r.name,
        r.state,
        dict(r.spec),
        r.metric,
        r.mode,
        r.scheduler,
        r.experiment_path,
        dict(r.runtime or {}),
        r.best_job_id,
        r.best_adapter,
        r.best_value,
        r.error,
        r.created_at,
        r.updated_at,
        r.finished_at,
    )
