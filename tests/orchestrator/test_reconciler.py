"""Orphaned jobs are settled, live ones are left alone (a real store; no Ray needed)."""

from __future__ import annotations

import time

from jobs.states import JobState
from jobs.store import JobStore
from orchestrator.reconciler import settle_orphans
from tests.jobs.conftest import minilm_spec

SPEC = minilm_spec(name="j", method={"method": "lora"})


def test_a_silent_owner_gets_its_job_failed_and_a_cancel_completed(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    running = store.submit(SPEC)
    store.claim(running.id, "runner-1", reason="test")
    store.transition(running.id, JobState.RUNNING)
    store.heartbeat(running.id, "runner-1")
    cancelling = store.submit(SPEC)
    store.transition(cancelling.id, JobState.RUNNING)
    store.transition(cancelling.id, JobState.CANCELLING)
    fresh = store.submit(SPEC)
    store.claim(fresh.id, "runner-3", reason="test")
    never_handed_over = store.submit(SPEC)  # PENDING with no runtime: nobody owns it yet

    time.sleep(0.3)
    store.heartbeat(fresh.id, "runner-3")  # alive just now
    settled = {j.id: j for j in settle_orphans(store, timeout_s=0.2)}

    assert set(settled) == {running.id, cancelling.id}
    assert settled[running.id].state is JobState.FAILED
    assert "owner runner-1 silent for" in settled[running.id].error
    assert settled[cancelling.id].state is JobState.CANCELLED
    assert store.get(fresh.id).state is JobState.QUEUED
    assert store.get(never_handed_over.id).state is JobState.PENDING
    assert settle_orphans(store, timeout_s=0.2) == []  # settling twice changes nothing


def test_with_resubmission_an_orphan_gets_new_owners_until_its_attempts_run_out(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    running, queued = store.submit(SPEC), store.submit(SPEC)
    store.claim(running.id, "runner-1", reason="test")
    store.transition(running.id, JobState.RUNNING)
    store.claim(queued.id, "runner-2", reason="test")
    resubmitted: list[str] = []
    time.sleep(0.3)
    settle_orphans(store, timeout_s=0.2, resubmit=resubmitted.append, max_attempts=1)
    assert sorted(resubmitted) == sorted([running.id, queued.id])
    assert store.get(running.id).state is JobState.RETRYING and store.get(running.id).attempt == 1
    assert store.get(queued.id).state is JobState.PENDING  # its new runner queues it again
    assert "resubmitted (attempt 1 of 1)" in store.events(running.id)[-1].reason

    time.sleep(0.3)  # the new owner of `running` died too: no attempts left
    settle_orphans(store, timeout_s=0.2, resubmit=resubmitted.append, max_attempts=1)
    assert store.get(running.id).state is JobState.FAILED and len(resubmitted) == 2


def test_a_dashboard_that_does_not_answer_settles_nothing(tmp_path):
    from orchestrator.cluster import Cluster
    from orchestrator.reconciler import UNREACHABLE, ray_job_status

    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    job = store.submit(SPEC)
    store.set_runtime(job.id, ray_submission_id=f"peftfleet-{job.id}")
    store.claim(job.id, "runner-1", reason="test")
    silent = Cluster("127.0.0.1:9", started_here=False)  # nothing listens there: no answer, not "no such job"
    assert ray_job_status(silent, f"peftfleet-{job.id}") == UNREACHABLE
    time.sleep(0.3)
    assert settle_orphans(store, timeout_s=0.2, cluster=silent) == []
    assert store.get(job.id).state is JobState.QUEUED
    assert [j.id for j in settle_orphans(store, timeout_s=0.2)] == [job.id]  # no cluster to ask: silence settles


def test_an_orphaned_sweep_trial_is_settled_not_resubmitted_outside_its_sweep(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    job = store.submit(SPEC)
    store.set_runtime(job.id, sweep_id="s1", ray_submission_id="peftfleet-sweep-s1")
    store.claim(job.id, "sweep-s1:trial_0", reason="test")
    resubmitted: list[str] = []
    time.sleep(0.3)
    settle_orphans(store, timeout_s=0.2, resubmit=resubmitted.append, max_attempts=3)
    assert resubmitted == [] and store.get(job.id).state is JobState.FAILED
