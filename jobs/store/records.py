"""What the job store hands out: immutable records of jobs, their events and metrics, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from jobs.spec import JobSpec, parse_job_spec
from jobs.states import JobState
from jobs.store.schema import JobRow


class NotFound(KeyError):
    """A record the store does not have; the message reads as a sentence (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class JobNotFound(NotFound):
    pass


class OwnershipLost(RuntimeError):
    """The caller no longer owns the job (another runner claimed it, or it was settled or handed back):
    it must stop working on it and write nothing more."""


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
    def from_row(cls, row: JobRow) -> JobRecord:
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
    owner: str | None = None  # who held the job after this change (None: nobody, e.g. handed back)


@dataclass(frozen=True)
class Metric:
    step: int
    name: str
    value: float
    at: float
