"""A PBT trial's job waits at each checkpoint until its trial's scheduler has decided on it.

Tune's own function trainables train in lockstep with the scheduler (``tune.report`` returns only when
Tune asks for the next result). A peftfleet trial's job trains apart from its trial (in Ray Train
workers or in a base group) and the trial reports what reaches the store, so a fast job could train
past the checkpoints PBT should have acted on, or finish before PBT saw them. So the job holds after
recording each checkpoint (``checkpoint_step``) until its trial marks the step decided: the trial
reported it and Tune asked for the next result (PBT chose to continue it). A job that left RUNNING while
held (PBT exploited or paused its trial, whose next job stopped this one) stays held: it trains no
further step while its group removes it or its workers are removed. A solo job's rank 0 waits (the
other ranks wait at the next collective); a base group trains its other members while one is held.

A hold lasts at most ``PEFTFLEET_PBT_HOLD_S`` seconds (default 300): a sweep driver that died does not
stall its trials' jobs for ever (its resumed driver re-attaches and decides again).
"""

from __future__ import annotations

import os
import time

from jobs.states import JobState
from jobs.store import JobStore

DECIDED = "pbt_decided_step"  # the job's runtime field its trial sets


def hold_timeout_s() -> float:
    return float(os.environ.get("PEFTFLEET_PBT_HOLD_S", "300"))


def holds_at_checkpoints(store: JobStore, job_id: str) -> bool:
    """Whether the job is a trial of a PBT sweep (whose checkpoints its trial's scheduler decides on)."""
    sweep = store.get(job_id).runtime.get("sweep_id")
    return bool(sweep) and store.sweeps.get(sweep).scheduler == "pbt"


def mark_decided(store: JobStore, job_id: str, step: int) -> None:
    """The trial's side: the scheduler has decided on the job's checkpoint at ``step``; it may train on."""
    store.set_runtime(job_id, **{DECIDED: step})


class Hold:
    """The job's side: after ``begin(step)``, ``waiting()`` is True while the job must not train past the checkpoint at
    ``step`` (checked against the store at most every ``poll_s`` seconds)."""

    def __init__(self, store: JobStore, job_id: str, *, poll_s: float = 0.2):
        self.store, self.job_id, self.poll_s = store, job_id, poll_s
        self.active = holds_at_checkpoints(store, job_id)
        self.step: int | None = None
        self._since = self._checked = 0.0

    def begin(self, step: int) -> None:
        """The checkpoint at ``step`` is recorded: hold from now (a no-op unless the job is a PBT trial)."""
        if self.active:
            self.step, self._since, self._checked = step, time.monotonic(), 0.0

    def waiting(self) -> bool:
        if self.step is None:
            return False
        now = time.monotonic()
        if now - self._since > hold_timeout_s():
            print(f"job {self.job_id[:12]}: no decision on its checkpoint at step {self.step} after "
                  f"{hold_timeout_s():.0f} s (is its sweep's driver gone?): training on", flush=True)
            self.step = None
            return False
        if now - self._checked < self.poll_s:
            return True
        self._checked = now
        job = self.store.get(self.job_id)
        if job.state is JobState.RUNNING and job.runtime.get(DECIDED, -1) >= self.step:
            self.step = None
            return False
        return True  # undecided, or stopped: never a step past the checkpoint

    def wait(self) -> None:
        """Block until the hold ends (a solo job's rank 0)."""
        while self.waiting():
            time.sleep(self.poll_s)
