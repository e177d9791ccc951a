"""Many real processes on one store: no lost or duplicated rows, idempotency holds, CAS has one winner."""

from __future__ import annotations

import multiprocessing

from jobs.states import JobState
from tests.jobs import store_workers
from tests.jobs.conftest import minilm_spec

WORKERS, PER_WORKER, OVERLAP = 8, 50, 10


def run_processes(target, arg_lists: list[tuple]) -> list:
    """One real process per argument tuple, released together by a barrier; their return values."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(arg_lists)), ctx.Queue()
    procs = [
        ctx.Process(target=store_workers.run_together, args=(target, barrier, results, i, *args))
        for i, args in enumerate(arg_lists)
    ]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [out[i] for i in range(len(arg_lists))]


def test_8_processes_x_50_submissions_give_exactly_400_jobs(store, store_url, tmp_path):
    results = run_processes(
        store_workers.submit_many,
        [(store_url, str(tmp_path / "home"), w, PER_WORKER, OVERLAP, WORKERS) for w in range(WORKERS)],
    )

    ids_by_key: dict[str, set[str]] = {}
    for pairs in results:
        assert len(pairs) == PER_WORKER + OVERLAP
        for key, job_id in pairs:
            ids_by_key.setdefault(key, set()).add(job_id)
    assert len(ids_by_key) == WORKERS * PER_WORKER
    assert all(len(ids) == 1 for ids in ids_by_key.values()), "one key produced two jobs"
    assert store.count_jobs() == WORKERS * PER_WORKER
    stored = store.list_jobs(limit=None)
    assert {j.idempotency_key: j.id for j in stored} == {k: next(iter(v)) for k, v in ids_by_key.items()}
    assert all(len(store.events(j.id)) == 1 for j in stored[:25])


def test_racing_processes_settle_a_job_exactly_once(store, store_url, tmp_path):
    job = store.submit(minilm_spec())
    store.transition(job.id, JobState.RUNNING)
    targets = ["SUCCEEDED", "FAILED", "CANCELLED", "RETRYING"] * 2
    won = run_processes(store_workers.race_to_settle, [(store_url, str(tmp_path / "home"), job.id, t) for t in targets])
    assert sum(won) == 1, f"{sum(won)} processes moved the job out of RUNNING"
    winner = targets[won.index(True)]
    assert store.get(job.id).state.value == winner
    assert [(e.from_state, e.to_state) for e in store.events(job.id)][1:] == [
        (JobState.PENDING, JobState.RUNNING),
        (JobState.RUNNING, JobState(winner)),
    ]
