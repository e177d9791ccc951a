"""Settling orphans: a live job (or sweep) whose owner stopped is never left live forever, and what a
killed process left in storage is cleaned.

The owner of a job is the runner process on the cluster; it heartbeats to the store every few
seconds. A job in QUEUED, RUNNING, RETRYING or CANCELLING (or PENDING after it was handed to Ray)
whose last sign of life is older than the timeout is checked against Ray when Ray is reachable —
a Ray job still PENDING/RUNNING is left alone — and otherwise settled: FAILED, or CANCELLED if a
cancel was already requested. Clients run this while they wait; any process may run it.

With ``resubmit`` (a callable taking a job id) and ``max_attempts``, an orphan that was queued or
training is instead handed back for another run — RUNNING → RETRYING, QUEUED → PENDING — and
``resubmit`` starts a new owner for it (:func:`hand_to_ray`), which resumes from the job's last
checkpoint. A sweep whose driver Ray says ended while the sweep is live is INTERRUPTED
(:func:`settle_orphan_sweeps`); :func:`clean_storage` removes temporary folders and unrecorded
artifacts older than a grace period. Ray's answer is trusted only when it gives one: a dashboard that
did not answer (:data:`UNREACHABLE`) settles nothing. The standing reconciler
(``orchestrator.reconciler_actor``) runs all three on a timer; waiting clients run the first.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.states import IllegalTransition, JobState
from jobs.store import JobRecord, JobStore, OwnershipLost
from jobs.store.sweep_registry import LIVE_SWEEP, SweepChanged
from orchestrator.cluster import RAY_LIVE, Cluster, launch

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
        # A sweep's trial belongs to its sweep: a resume runs it again (from its checkpoint while it is live).
        trial = bool(job.runtime.get("sweep_id"))
        if resubmit is not None and job.attempt < max_attempts and job.state in RESUBMITTABLE and not trial:
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


def hand_to_ray(store: JobStore, cluster: Cluster, job_id: str, submission_id: str, env: dict[str, str],
                failure: str) -> None:
    """Launch the job's runner as a Ray job under ``submission_id``; a job that cannot be handed over is
    FAILED (unless something settled it meanwhile) and the error re-raised."""
    job = store.get(job_id)
    try:
        launch(cluster, f"orchestrator.runner {job_id} ray-job:{submission_id}", submission_id=submission_id,
               resources=job.job_spec.resources, env=env, metadata={"peftfleet_job": job_id, "name": job.name})
    except Exception as e:
        try:
            store.transition(job_id, JobState.FAILED, reason=failure, error=f"{type(e).__name__}: {e}")
        except IllegalTransition:
            pass  # settled meanwhile (a cancel): nothing was launched for it
        raise


def resubmit(store: JobStore, cluster: Cluster, job_id: str, env: dict[str, str]) -> None:
    """A new runner for a job handed back (no owner): it claims the job and resumes from its last checkpoint."""
    job = store.get(job_id)
    submission_id = f"peftfleet-{job.id}-a{job.attempt}-{int(time.time())}"
    store.set_runtime(job_id, ray_submission_id=submission_id, dashboard_url=cluster.dashboard_url)
    hand_to_ray(store, cluster, job_id, submission_id, env, "could not hand the job back to Ray")


def settle_orphan_sweeps(store: JobStore, cluster: Cluster, *, timeout_s: float) -> list[str]:
    """INTERRUPTED for every live sweep whose driver Ray says ended (or does not know, once the sweep has
    been still for ``timeout_s``: a driver being launched is not known yet); their ids. Each can be
    resumed (``peftfleet sweep resume``)."""
    interrupted = []
    now = time.time()
    for sweep in store.sweeps.list(limit=None):
        submission = sweep.runtime.get("ray_submission_id")
        if sweep.state not in LIVE_SWEEP or not submission or now - sweep.updated_at < timeout_s:
            continue
        status = ray_job_status(cluster, submission)
        if status == UNREACHABLE or status in RAY_LIVE:
            continue
        try:
            store.sweeps.update(sweep.id, state="INTERRUPTED", error=f"its driver {submission} ended ({status})",
                                expected=LIVE_SWEEP, driver=submission)
            interrupted.append(sweep.id)
        except SweepChanged:
            pass
    return interrupted


def clean_storage(store: JobStore, *, grace_s: float, checkpoint_root: str | None = None) -> dict[str, list[str]]:
    """Remove what killed processes left and nobody will finish: temporary folders (artifact storage,
    its download cache, and under ``checkpoint_root``) and artifact folders no record names, each only
    once untouched for ``grace_s`` seconds (younger ones may be work in progress)."""
    temp = store.artifacts.clean_temp(grace_s)
    if checkpoint_root and os.path.isdir(checkpoint_root):
        now = time.time()
        for folder in Path(checkpoint_root).glob("**/.*.tmp-*"):
            if folder.is_dir() and not folder.is_symlink() and now - folder.stat().st_mtime > grace_s:
                shutil.rmtree(folder, ignore_errors=True)
                temp.append(str(folder))
    known = {a.uri for a in store.adapters.list()} | {s.uri for s in store.subspaces.list()}
    abandoned = store.artifacts.abandoned(known, grace_s)
    for uri in abandoned:
        store.artifacts.delete(uri)
    return {"temp": temp, "abandoned": abandoned}


__all__: list[Any] = ["UNREACHABLE", "clean_storage", "hand_to_ray", "ray_job_status", "resubmit",
                      "settle_orphan_sweeps", "settle_orphans"]
