"""Fault injection on a real local Ray cluster: kill -9 a job's runner, one of its Ray Train workers, its
base group or the standing reconciler at seeded random points, with no client waiting, and check what
nothing may break: every job ends settled (or resumed to the end), no job ever had two owners at once,
only SUCCEEDED jobs own adapters and each of those verifies, and no temporary folder outlives the
grace period.

``make test`` runs ``PEFTFLEET_FAULT_RUNS`` (10) runs; ``benchmarks/faults.py`` runs more and writes
its tally to ``benchmarks/results/``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from jobs.states import JobState
from orchestrator import Client
from orchestrator.reconciler_actor import NAMESPACE, reconciler_name

RUNS = int(os.environ.get("PEFTFLEET_FAULT_RUNS", "10"))
SEED = int(os.environ.get("PEFTFLEET_FAULT_SEED", "0"))
TARGETS = ("runner", "worker", "group", "reconciler")
GRACE_S = 5.0


def _processes(match) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if match(p):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _title(p: psutil.Process) -> str:
    return " ".join(p.info["cmdline"] or [])


def _env(p: psutil.Process, name: str) -> str | None:
    try:
        return p.environ().get(name)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def victims(target: str, job) -> list[psutil.Process]:
    """The live processes that are ``target`` for ``job``."""
    submission = job.runtime.get("ray_submission_id")
    if target == "runner":
        return _processes(lambda p: f"orchestrator.runner {job.id}" in _title(p))
    if target == "worker":
        return _processes(lambda p: "RayTrainWorker" in _title(p)
                          and _env(p, "PEFTFLEET_SUBMISSION_ID") == submission)
    if target == "group":
        return _processes(lambda p: "BaseGroupActor" in _title(p))
    return _processes(lambda p: "Reconciler" in _title(p) and "ray::" in _title(p))


def kill_at_random_point(client: Client, job_id: str, target: str, after: JobState, delay_s: float,
                         log: list) -> None:
    """Once the job reaches ``after`` (QUEUED or RUNNING; or ends), wait ``delay_s`` and kill -9 the target."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = client.store.get(job_id)
        if job.state is after or job.state is JobState.RUNNING or job.state.is_terminal:
            break
        time.sleep(0.1)
    time.sleep(delay_s)
    job = client.store.get(job_id)
    found = [] if job.state.is_terminal else victims(target, job)
    for p in found:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    log.append((job_id, target, round(delay_s, 2), str(job.state), len(found)))


def owners_never_overlap(events) -> bool:
    """A new owner only ever follows a hand-back (no owner): never another live owner directly."""
    held = None
    for e in events:
        if e.owner is not None and held is not None and e.owner != held and not e.to_state.is_terminal:
            return False
        held = e.owner if not e.to_state.is_terminal else held
    return True


def stale_temp_folders(root: Path, older_than_s: float) -> list[Path]:
    now = time.time()
    return [p for p in root.rglob("*") if ".tmp-" in p.name and p.is_dir() and now - p.stat().st_mtime > older_than_s]


@pytest.mark.timeout(1500)
def test_kill_9_at_random_points_leaves_every_job_settled_and_the_store_true(
    ray_cluster, tiny_spec, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEFTFLEET_RECONCILER", "1")
    monkeypatch.setenv("PEFTFLEET_RECONCILER_INTERVAL_S", "1")
    monkeypatch.setenv("PEFTFLEET_RECONCILER_TIMEOUT_S", "8")
    monkeypatch.setenv("PEFTFLEET_RECONCILER_GRACE_S", str(GRACE_S))
    monkeypatch.setenv("PEFTFLEET_RESUBMIT_ORPHANS", "3")
    monkeypatch.setenv("PEFTFLEET_MAX_FAILURES", "2")  # Ray Train restarts a worker group whose worker died
    client = Client(home=tmp_path / "home", heartbeat_timeout_s=8, resubmit_orphans=3)
    rng = random.Random(SEED)
    targets = [TARGETS[i % len(TARGETS)] for i in range(RUNS)]
    rng.shuffle(targets)
    plan = [(t, rng.choice([JobState.QUEUED, JobState.RUNNING]), rng.uniform(0.0, 4.0)) for t in targets]
    jobs = []
    for i, (target, *_) in enumerate(plan):
        spec = tiny_spec(name=f"fault-{i}", packing="auto" if target == "group" else "off",
                         dataset={"train_size": 1024}, training={"checkpoint_every_steps": 16})
        jobs.append(client.submit(spec).id)
    reconciler = ray.get_actor(reconciler_name(client.store.url), namespace=NAMESPACE)
    log: list = []
    killers = [threading.Thread(target=kill_at_random_point, args=(client, job_id, *step, log))
               for job_id, step in zip(jobs, plan)]  # each job's kill on its own clock
    for killer in killers:
        killer.start()
    for killer in killers:
        killer.join()

    deadline = time.monotonic() + 900
    while not all(client.store.get(j).state.is_terminal for j in jobs):  # no client settles: the reconciler does
        assert time.monotonic() < deadline, [(j[:8], str(client.store.get(j).state)) for j in jobs]
        time.sleep(2)
    time.sleep(GRACE_S + 1)
    ray.get(reconciler.tick.remote(), timeout=60)  # it survived its own kills (Ray restarted it)

    kills = sum(1 for *_, n in log if n)
    print(f"fault plan (seed {SEED}): {log}; {kills} kills")
    assert kills >= RUNS // 3, log  # the plan really hit live processes
    for job_id in jobs:
        job = client.store.get(job_id)
        assert job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED), job.state
        events = client.store.events(job_id)
        assert owners_never_overlap(events), [(str(e.to_state), e.owner) for e in events]
        adapters = client.adapters.list(job_id=job_id)
        assert len(adapters) == (1 if job.state is JobState.SUCCEEDED else 0), (job.state, adapters)
        for adapter in adapters:
            client.adapters.local_folder(adapter.name)  # verifies every file against the store's hashes
    succeeded = sum(client.store.get(j).state is JobState.SUCCEEDED for j in jobs)
    assert succeeded >= RUNS - 2, [(j[:8], str(client.store.get(j).state), client.store.get(j).error) for j in jobs]
    assert stale_temp_folders(Path(client.store.artifacts.root), GRACE_S + 30) == []


@pytest.mark.timeout(900)
def test_a_sweep_driver_killed_at_a_random_point_is_interrupted_and_resumes(ray_cluster, tiny_spec, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("PEFTFLEET_RECONCILER", "1")
    monkeypatch.setenv("PEFTFLEET_RECONCILER_INTERVAL_S", "1")
    monkeypatch.setenv("PEFTFLEET_RECONCILER_TIMEOUT_S", "8")
    client = Client(home=tmp_path / "home", heartbeat_timeout_s=8)
    rng = random.Random(SEED)
    spec = tiny_spec(training={"eval_every_steps": 8}, resources={"num_workers": 1, "cpus_per_worker": 0.9})
    sweep = client.tune(spec, search_space={"training.lr": {"grid": [0.01, 0.05]}}, metric="eval_loss", mode="min",
                        scheduler="fifo", max_concurrent=1, name="faulty")
    deadline = time.monotonic() + 300
    while not any(client.store.get(t["job"]).state is JobState.RUNNING for t in sweep.trials()):
        assert time.monotonic() < deadline, sweep.trials()
        time.sleep(0.2)
    delay = rng.uniform(0.0, 3.0)
    time.sleep(delay)
    driver = sweep.record().runtime["ray_submission_id"]
    victims_ = _processes(lambda p: "orchestrator.tune.driver" in _title(p) and sweep.id in _title(p))
    assert victims_, "the sweep's driver process was not found"
    for p in victims_:
        p.send_signal(signal.SIGKILL)
    print(f"sweep driver kill (seed {SEED}): {len(victims_)} processes, {delay:.2f} s after a trial ran")

    deadline = time.monotonic() + 300  # no client waits: the standing reconciler notices
    while client.store.sweeps.get(sweep.id).state != "INTERRUPTED" or not all(
        client.store.get(t["job"]).state.is_terminal for t in sweep.trials()
    ):
        assert time.monotonic() < deadline, (client.store.sweeps.get(sweep.id).state, sweep.trials())
        time.sleep(1)
    assert driver in client.store.sweeps.get(sweep.id).error
    for t in sweep.trials():
        job = client.store.get(t["job"])
        assert owners_never_overlap(client.store.events(job.id))
        assert len(client.adapters.list(job_id=job.id)) == (job.state is JobState.SUCCEEDED)

    record = sweep.resume().wait(timeout=600)
    assert record.state == "SUCCEEDED", (record.error, sweep.trials())
    assert {t["params"]["training.lr"] for t in sweep.trials() if t["state"] == "SUCCEEDED"} == {0.01, 0.05}
