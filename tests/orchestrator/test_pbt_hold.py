"""A PBT trial's job holds at each checkpoint until its trial marks it decided (a real store; no Ray needed)."""

from __future__ import annotations

import pytest

from jobs.states import JobState
from jobs.store import JobStore
from jobs.sweep_spec import parse_sweep_spec
from orchestrator.tune.pbt_hold import Hold, mark_decided
from tests.jobs.conftest import minilm_spec

SPEC = minilm_spec(name="t", method={"method": "lora"})


def trial_job(tmp_path, scheduler: str) -> tuple[JobStore, str]:
    tmp_path.mkdir(exist_ok=True)
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path)
    sweep = store.sweeps.create(parse_sweep_spec({"name": "s", "spec": SPEC, "scheduler": scheduler,
                                                  "search_space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}}))
    job = store.submit(SPEC)
    store.transition(job.id, JobState.RUNNING)
    store.set_runtime(job.id, sweep_id=sweep.id)
    return store, job.id


def test_a_pbt_trials_job_holds_until_that_checkpoint_is_decided(tmp_path):
    store, job_id = trial_job(tmp_path, "pbt")
    hold = Hold(store, job_id, poll_s=0)
    assert not hold.waiting()  # nothing to wait for before its first checkpoint
    hold.begin(8)
    assert hold.waiting()
    mark_decided(store, job_id, 8)
    assert not hold.waiting()
    hold.begin(16)
    mark_decided(store, job_id, 8)  # an earlier decision does not release a later checkpoint
    assert hold.waiting()
    store.transition(job_id, JobState.STOPPED, reason="PBT exploit")  # its trial continues from another job
    mark_decided(store, job_id, 16)
    assert hold.waiting()  # stopped while held: it trains no further step, even were that step decided


def test_an_asha_trial_never_holds_and_a_hold_ends_after_its_timeout(tmp_path, monkeypatch):
    store, job_id = trial_job(tmp_path, "asha")
    hold = Hold(store, job_id, poll_s=0)
    hold.begin(8)
    assert not hold.active and not hold.waiting()
    store, job_id = trial_job(tmp_path / "pbt", "pbt")
    hold = Hold(store, job_id, poll_s=0)
    monkeypatch.setenv("PEFTFLEET_PBT_HOLD_S", "0")  # its sweep's driver died: the job trains on
    hold.begin(8)
    assert not hold.waiting()


@pytest.fixture(autouse=True)
def _no_hold_timeout_by_default(monkeypatch):
    monkeypatch.delenv("PEFTFLEET_PBT_HOLD_S", raising=False)
