"""One owner per job: claims, owner-checked writes, registration with success in one transaction, one launch
per submission, and hand-backs for new runners (a real store, SQLite and PostgreSQL; no Ray needed)."""

from __future__ import annotations

import threading

import pytest

from jobs.spec import parse_job_spec
from jobs.states import IllegalTransition, JobState
from jobs.store import OwnershipLost
from jobs.store.schema import JobRow
from orchestrator.reconciler import settle_orphans
from orchestrator.train_worker import register_job_adapter
from tests.jobs.conftest import minilm_spec
from tests.jobs.test_adapter_registry import make_adapter

SPEC = minilm_spec(name="own", method={"method": "lora"})


def test_a_second_runner_cannot_take_a_claimed_job(store):
    job = store.submit(SPEC)
    assert store.claim(job.id, "runner-a", reason="test").owner == "runner-a"
    with pytest.raises(OwnershipLost, match="owned by runner-a"):
        store.claim(job.id, "runner-b", reason="test")
    assert not store.heartbeat(job.id, "runner-b")  # a heartbeat no longer steals the job
    assert store.get(job.id).owner == "runner-a"
    store.transition(job.id, JobState.RUNNING, as_owner="runner-a")
    with pytest.raises(OwnershipLost):
        store.transition(job.id, JobState.FAILED, as_owner="runner-b")
    with pytest.raises(OwnershipLost):
        store.record_metrics(job.id, 1, {"loss": 1.0}, owner="runner-b")
    store.record_metrics(job.id, 1, {"loss": 1.0}, owner="runner-a")
    assert [m.value for m in store.metrics(job.id)] == [1.0]


def test_a_runner_of_a_settled_job_writes_nothing_more(store):
    job = store.submit(SPEC)
    store.claim(job.id, "runner-a", reason="test")
    store.transition(job.id, JobState.RUNNING, as_owner="runner-a")
    store.transition(job.id, JobState.FAILED, reason="settled by someone else")
    assert not store.heartbeat(job.id, "runner-a")
    with pytest.raises(OwnershipLost):
        store.record_metrics(job.id, 2, {"loss": 0.5}, owner="runner-a")
    assert store.metrics(job.id) == []


def running_job_with_an_adapter_folder(store, bases, tmp_path):
    """A job runner-a claimed and runs, and an adapter folder trained on its base."""
    folder, _ = make_adapter(tmp_path, bases["a"])
    job = store.submit(SPEC)
    store.claim(job.id, "runner-a", reason="test")
    store.transition(job.id, JobState.RUNNING, as_owner="runner-a")
    return parse_job_spec(SPEC), folder, job


def test_the_adapter_and_success_land_together_and_a_resubmit_finds_the_job_done(store, bases, tmp_path):
    spec, folder, job = running_job_with_an_adapter_folder(store, bases, tmp_path)
    name = register_job_adapter(store, spec, job.id, bases["a"][1], str(folder), {}, owner="runner-a")
    assert store.get(job.id).state is JobState.SUCCEEDED and store.adapters.get(name).job_id == job.id
    again = store.claim(job.id, "runner-b", reason="resubmitted")  # e.g. the runner died before settling
    assert again.state is JobState.SUCCEEDED and again.owner == "runner-a"


@pytest.mark.parametrize("settled", [JobState.FAILED, JobState.CANCELLED])
def test_a_settled_job_never_gets_an_adapter(store, bases, tmp_path, settled):
    spec, folder, job = running_job_with_an_adapter_folder(store, bases, tmp_path)
    store.transition(job.id, settled, reason="the reconciler thought it dead")
    with pytest.raises(IllegalTransition):
        register_job_adapter(store, spec, job.id, bases["a"][1], str(folder), {}, owner="runner-a")
    assert store.adapters.list(job_id=job.id) == []
    assert store.get(job.id).state is settled


def test_a_lost_runner_cannot_register_for_the_job_it_lost(store, bases, tmp_path):
    spec, folder, job = running_job_with_an_adapter_folder(store, bases, tmp_path)
    store.transition(job.id, JobState.RETRYING, release=True, reason="handed back")
    store.claim(job.id, "runner-b", reason="new runner")
    with pytest.raises(OwnershipLost):
        register_job_adapter(store, spec, job.id, bases["a"][1], str(folder), {}, owner="runner-a")
    assert store.adapters.list(job_id=job.id) == []


def test_one_idempotency_key_launches_once_even_when_submits_race(store):
    job = store.submit(SPEC, idempotency_key="nightly")
    barrier, wins = threading.Barrier(8), []

    def submit_and_launch():
        again = store.submit(SPEC, idempotency_key="nightly")
        barrier.wait()
        wins.append(store.claim_launch(again.id, f"peftfleet-{again.id}"))

    threads = [threading.Thread(target=submit_and_launch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert store.get(job.id).runtime["ray_submission_id"] == f"peftfleet-{job.id}"


def test_a_cancelled_pending_job_is_never_launched_nor_run(store):
    job = store.submit(SPEC)
    store.transition(job.id, JobState.CANCELLED, expected=[JobState.PENDING], reason="cancelled")
    assert not store.claim_launch(job.id, f"peftfleet-{job.id}")
    assert store.claim(job.id, "runner-a", reason="late runner").state is JobState.CANCELLED


def test_concurrent_runtime_updates_all_land(store):
    job = store.submit(SPEC)
    threads = [threading.Thread(target=store.set_runtime, args=(job.id,), kwargs={f"k{i}": i}) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(job.id).runtime == {f"k{i}": i for i in range(12)}


def test_a_resubmitted_orphan_belongs_to_its_new_runner_only(store):
    job = store.submit(SPEC)
    store.claim(job.id, "runner-a", reason="test")
    store.transition(job.id, JobState.RUNNING, as_owner="runner-a")
    with store.db.write() as s:  # runner-a went silent long ago
        s.get(JobRow, job.id).heartbeat_at = 1.0
    started: list[str] = []
    settle_orphans(store, timeout_s=1, resubmit=started.append, max_attempts=2)
    assert started == [job.id]
    back = store.get(job.id)
    assert (back.state, back.owner, back.attempt) == (JobState.RETRYING, None, 1)
    assert store.claim(job.id, "runner-b", reason="new runner").owner == "runner-b"
    assert not store.heartbeat(job.id, "runner-a")  # the old runner, if alive after all, must stop
    with pytest.raises(OwnershipLost):
        store.transition(job.id, JobState.RUNNING, as_owner="runner-a")


def test_sweep_records_change_by_compare_and_swap(store):
    from jobs.store.sweep_registry import LIVE_SWEEP, SweepChanged
    from jobs.sweep_spec import parse_sweep_spec

    space = {"method.r": {"choice": [4, 8]}}
    sweep = store.sweeps.create(parse_sweep_spec({"name": "s", "spec": SPEC, "search_space": space}))
    store.sweeps.update(sweep.id, state="INTERRUPTED")
    store.sweeps.update(sweep.id, state="PENDING", runtime={"ray_submission_id": "d1"}, expected=("INTERRUPTED",))
    with pytest.raises(SweepChanged, match="is PENDING"):  # a second resume starts no second driver
        store.sweeps.update(sweep.id, state="PENDING", runtime={"ray_submission_id": "d2"}, expected=("INTERRUPTED",))
    with pytest.raises(SweepChanged, match="driven by d1"):  # only the driver it names takes it over
        store.sweeps.update(sweep.id, state="RUNNING", expected=("PENDING",), driver="d2")
    store.sweeps.update(sweep.id, state="RUNNING", expected=("PENDING",), driver="d1")
    store.sweeps.update(sweep.id, state="SUCCEEDED", expected=("RUNNING",), driver="d1")
    with pytest.raises(SweepChanged):  # a late status() cannot overwrite the result
        store.sweeps.update(sweep.id, state="INTERRUPTED", expected=LIVE_SWEEP, driver="d1")
    assert store.sweeps.get(sweep.id).state == "SUCCEEDED"
