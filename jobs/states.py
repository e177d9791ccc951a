"""Job states and the one table of transitions between them.

    PENDING ──► QUEUED ──► RUNNING ──► SUCCEEDED
       │          │  ▲        │ ├────► FAILED
       │          │  └─ RETRYING ◄┤
       │          │           ├────► CANCELLING ──► CANCELLED
       │          │           └────► STOPPED   (a sweep's scheduler ended it early: not a failure)
       └──────────┴──────────────────────────────► CANCELLED / FAILED

A terminal state never changes. Every change goes through ``jobs.store.job_store.JobStore.transition``,
which checks this table and updates the row by compare-and-swap.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"  # stored, not yet handed to the cluster
    QUEUED = "QUEUED"  # handed to the cluster, waiting for resources
    RUNNING = "RUNNING"  # workers are training; the owner sends heartbeats
    RETRYING = "RETRYING"  # a worker or node failed; resuming from the last checkpoint
    CANCELLING = "CANCELLING"  # cancel requested; the owner is stopping the work
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    STOPPED = "STOPPED"  # a sweep trial its scheduler (ASHA, PBT) ended early: a result, not a failure

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.STOPPED})

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.PENDING, S.CANCELLING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.RETRYING, S.CANCELLING, S.CANCELLED, S.STOPPED}),
    S.RETRYING: frozenset({S.QUEUED, S.RUNNING, S.CANCELLING, S.CANCELLED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED, S.SUCCEEDED}),  # the work may finish first
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.STOPPED: frozenset(),
}
del S


class IllegalTransition(RuntimeError):
    """A state change the table forbids, or one that lost a race (the row was not in ``from``)."""

    def __init__(self, job_id: str, current: JobState, target: JobState, detail: str = ""):
        self.job_id, self.current, self.target = job_id, current, target
        super().__init__(f"job {job_id}: {current} → {target} is not allowed{detail}")


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(job_id, current, target)
