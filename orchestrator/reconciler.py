"""Settling orphans: a live job whose owner stopped heartbeating is never left live forever.

The owner of a job is the runner process on the cluster; it heartbeats to the store every few
seconds. A job in QUEUED, RUNNING, RETRYING or CANCELLING (or PENDING after it was handed to Ray)
whose last sign of life is older than the timeout is checked against Ray when Ray is reachable —
a Ray job still PENDING/RUNNING is left alone — and otherwise settled: FAILED, or CANCELLED if a
cancel was already requested. Clients run this while they wait; any process may run it.

With ``resubmit`` (a callable taking a job id) and ``max_attempts``, an orphan that was queued or
training is instead handed back for another run — RUNNING → RETRYING, QUEUED → PENDING — and
``resubmit`` starts a new owner for it, which resumes from the job's last checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from jobs.states import IllegalTransition, JobState
from jobs.store import JobRecord, JobStore, OwnershipLost
from orchestrator.cluster import RAY_LIVE, Cluster

HEARTBEAT_INTERVAL_S = float(os.environ.get("PEFTFLEET_HEARTBEAT_INTERVAL_S", "5"))  # how often owners beat
LIVE = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.CANCELLING)
RESUBMITTABLE = {
    JobState.RUNNING: JobState.RETRYING,
    JobState.QUEUED: JobState.PENDING,
    JobState.RETRYING: JobState.RETRYING,
}


UNREACHABLE = "UNREACHABLE"  # the dashboard did not answer: nothing is known about the Ray job


def ray_job_status(cluster: Cluster, submission_id: str) -> str | None:
    """What Ray says of a submission: its status, None when Ray answers that it does not know it (the
    job is gone), or :data:`UNREACHABLE` when the dashboard did not answer (then nothing may be concluded)."""
    try:
        return str(cluster.jobs_client().get_job_status(submission_id))
    except Exception as e:  # noqa: BLE001 - sort the failure: "no such job" vs "no answer"
        if isinstance(e, RuntimeError) and "status code 404" in str(e):
            return None
        return UNREACHABLE


def settle_orphans(
    store: JobStore,
    *,
    timeout_s: float,
    cluster: Cluster | None = None,
    resubmit: Callable[[str], None] | None = None,
    max_attempts: int = 0,
) -> list[JobRecord]:
    settled = []
    now = time.time()
    for job in store.list_jobs(state=LIVE, limit=None):
        submission = job.runtime.get("ray_submission_id")
        if job.state is JobState.PENDING and not submission:
            continue  # not handed to anyone yet; nobody owns it to die
        last_sign = job.heartbeat_at or job.updated_at
        if now - last_sign < timeout_s:
            continue
        if cluster is not None and submission and ray_job_status(cluster, submission) in RAY_LIVE | {UNREACHABLE}:
            continue  # Ray says it still runs, or cannot say: a silent store is not a dead owner
        reason = f"owner {job.owner or '(none)'} silent for {now - last_sign:.0f} s (timeout {timeout_s:.0f} s)"
        if resubmit is not None and job.attempt < max_attempts and job.state in RESUBMITTABLE:
            try:
                back = RESUBMITTABLE[job.state]
                why = f"{reason}; resubmitted (attempt {job.attempt + 1} of {max_attempts})"
                if back is not job.state:  # handed back: no owner, so only the new runner can claim it
                    store.transition(job.id, back, reason=why, expected=[job.state], as_owner=job.owner, release=True)
                else:
                    store.release(job.id, owner=job.owner, reason=why)
                resubmit(job.id)
                settled.append(store.get(job.id))
            except (IllegalTransition, OwnershipLost):
                pass
            continue
        to = JobState.CANCELLED if job.state is JobState.CANCELLING else JobState.FAILED
        try:
            settled.append(
                store.transition(
                    job.id,
                    to,
                    reason=reason,
                    error=f"orphaned: {reason}" if to is JobState.FAILED else None,
                    expected=[job.state],
                    as_owner=job.owner,
                )
            )
        except (IllegalTransition, OwnershipLost):
            continue  # its owner or another reconciler got there first
    return settled
