"""The checkpoint registry: for every checkpoint a job wrote, its folder and the sha256 of each file.

The recipe records a checkpoint right after writing it; a restore looks the folder up here and
verifies every file against these hashes before anything in it is read (see
``jobs.training.checkpoints``), so whoever can write the checkpoint storage, but not the store,
cannot make a worker load bytes of their choosing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from jobs.states import JobState
from jobs.store.db import Database
from jobs.store.records import JobNotFound, OwnershipLost
from jobs.store.schema import CheckpointRow, JobRow


@dataclass(frozen=True)
class CheckpointRecord:
    job_id: str
    attempt: int
    step: int
    folder: str
    files: dict[str, str]
    created_at: float


class CheckpointRegistry:
    def __init__(self, db: Database):
        self.db = db

    def record(self, job_id: str, attempt: int, step: int, folder: str, files: dict[str, str], *,
               owner: str | None = None) -> CheckpointRecord:
        """Record (or re-record, when the same attempt rewrites a step) a checkpoint's files; with ``owner``,
        only while that owner holds the live job at ``attempt`` (else :class:`OwnershipLost`: a runner
        that lost its job records nothing a later attempt would resume from)."""
        try:
            with self.db.write() as s:
                if owner is not None:
                    job = s.get(JobRow, job_id)
                    if job is not None and (job.owner != owner or job.attempt != attempt
                                            or JobState(job.state).is_terminal):
                        raise OwnershipLost(f"job {job_id} is {job.state} at attempt {job.attempt}, owned by "
                                            f"{job.owner or 'nobody'}, not {owner} at attempt {attempt}: "
                                            "checkpoint not recorded")
                row = s.get(CheckpointRow, (job_id, attempt, step))
                if row is None:
                    row = CheckpointRow(job_id=job_id, attempt=attempt, step=step)
                    s.add(row)
                row.folder, row.files, row.created_at = str(folder), dict(files), time.time()
        except IntegrityError:
            raise JobNotFound(f"no job {job_id!r} to record a checkpoint for") from None
        return _record(row)

    def latest(self, job_id: str) -> CheckpointRecord | None:
        """The job's checkpoint with the highest step over all its attempts (ties: the latest attempt)."""
        with self.db.read() as s:
            row = s.scalars(
                select(CheckpointRow).where(CheckpointRow.job_id == job_id)
                .order_by(CheckpointRow.step.desc(), CheckpointRow.attempt.desc()).limit(1)
            ).first()
            return None if row is None else _record(row)

    def find(self, job_id: str, *, step: int | None = None, folder: str | None = None) -> CheckpointRecord | None:
        """The job's checkpoint holding ``step`` or written to ``folder`` (latest attempt first)."""
        query = select(CheckpointRow).where(CheckpointRow.job_id == job_id)
        if step is not None:
            query = query.where(CheckpointRow.step == step)
        if folder is not None:
            query = query.where(CheckpointRow.folder == str(folder))
        with self.db.read() as s:
            row = s.scalars(query.order_by(CheckpointRow.attempt.desc(), CheckpointRow.step.desc()).limit(1)).first()
            return None if row is None else _record(row)

    def list(self, job_id: str) -> list[CheckpointRecord]:
        with self.db.read() as s:
            rows = s.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id)
                             .order_by(CheckpointRow.attempt, CheckpointRow.step))
            return [_record(r) for r in rows]


def _record(r: CheckpointRow) -> CheckpointRecord:
    return CheckpointRecord(r.job_id, r.attempt, r.step, r.folder, dict(r.files), r.created_at)
