"""Functions run in separate processes by the concurrency and crash tests (importable by spawn)."""

from __future__ import annotations

import os
import random
import sys

from jobs.states import IllegalTransition, JobState
from jobs.store import JobStore
from tests.jobs.conftest import minilm_spec


def run_together(target, barrier, results, index: int, *args) -> None:
    """Process entry point: import, open the store, wait for every sibling, then race."""
    results.put((index, target(*args, barrier=barrier)))


def submit_many(
    url: str, home: str, worker: int, per_worker: int, overlap: int, workers: int, *, barrier
) -> list[tuple[str, str]]:
    """Submit this worker's keys plus ``overlap`` keys of the next worker, in a shuffled order."""
    store = JobStore(url, home=home)
    nxt = (worker + 1) % workers
    keys = [f"k{worker * per_worker + j}" for j in range(per_worker)] + [
        f"k{nxt * per_worker + j}" for j in range(overlap)
    ]
    random.Random(worker).shuffle(keys)
    barrier.wait(timeout=300)
    out = [(key, store.submit(minilm_spec(name=f"job-{key}"), idempotency_key=key).id) for key in keys]
    store.close()
    return out


def race_to_settle(url: str, home: str, job_id: str, target: str, *, barrier) -> bool:
    store = JobStore(url, home=home)
    barrier.wait(timeout=300)
    try:
        store.transition(job_id, JobState(target), reason=f"racer {target}", expected=[JobState.RUNNING])
        return True
    except IllegalTransition:
        return False
    finally:
        store.close()


def register_forever(url: str, home: str, storage: str, folder: str, fingerprint: str) -> None:
    """Register copies of one adapter until killed; prints each name once it is recorded."""
    store = JobStore(url, home=home, storage_url=storage)
    for i in range(10_000):
        store.adapters.register(
            folder,
            name=f"crash-{os.getpid()}-{i}",
            base_fingerprint=fingerprint,
            task="sequence-classification",
            task_name="t",
        )
        print(f"registered crash-{os.getpid()}-{i}", flush=True)


if __name__ == "__main__":
    register_forever(*sys.argv[1:6])
