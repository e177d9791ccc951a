"""Every (from, to) pair of states, tried on a real store: allowed ones happen, others are refused."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from jobs.states import ALLOWED, TERMINAL, IllegalTransition, JobState
from tests.jobs.conftest import minilm_spec

S = JobState

# One row per pair: the transition table written out, so a change to ALLOWED must change this too.
EXPECTED_ALLOWED = {
    (S.PENDING, S.QUEUED),
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.PENDING),
    (S.QUEUED, S.CANCELLING),
    (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.CANCELLING),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.STOPPED),
    (S.RETRYING, S.QUEUED),
    (S.RETRYING, S.RUNNING),
    (S.RETRYING, S.CANCELLING),
    (S.RETRYING, S.CANCELLED),
    (S.RETRYING, S.FAILED),
    (S.CANCELLING, S.CANCELLED),
    (S.CANCELLING, S.FAILED),
    (S.CANCELLING, S.SUCCEEDED),
}
PAIRS = list(itertools.product(JobState, JobState))


def path_to(target: JobState) -> list[JobState]:
    """Shortest chain of allowed transitions from PENDING to ``target``."""
    queue, seen = deque([[S.PENDING]]), {S.PENDING}
    while queue:
        path = queue.popleft()
        if path[-1] is target:
            return path[1:]
        for nxt in ALLOWED[path[-1]]:
            if nxt not in seen:
                seen.add(nxt)
                queue.append(path + [nxt])
    raise AssertionError(f"{target} is unreachable")


def test_the_table_is_the_one_documented():
    assert {(a, b) for a, targets in ALLOWED.items() for b in targets} == EXPECTED_ALLOWED
    assert TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.STOPPED}
    assert all(not ALLOWED[t] for t in TERMINAL)
    assert [s.is_terminal for s in JobState] == [s in TERMINAL for s in JobState]


@pytest.mark.parametrize("current,target", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_pair(store, current, target):
    job = store.submit(minilm_spec())
    for step in path_to(current):
        store.transition(job.id, step, reason="setup")
    before = store.events(job.id)
    if (current, target) in EXPECTED_ALLOWED:
        after = store.transition(job.id, target, reason="under test")
        assert after.state is target
        assert store.events(job.id)[-1].from_state is current
        assert store.events(job.id)[-1].to_state is target
        assert store.events(job.id)[-1].reason == "under test"
        assert (after.finished_at is not None) == target.is_terminal
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} → {target.value} is not allowed"):
            store.transition(job.id, target)
        assert store.get(job.id).state is current
        assert store.events(job.id) == before, "a refused transition was recorded"


def test_expected_state_guards_against_stale_callers(store):
    job = store.submit(minilm_spec())
    store.transition(job.id, S.QUEUED)
    with pytest.raises(IllegalTransition, match="expected it in"):
        store.transition(job.id, S.RUNNING, expected=[S.PENDING])
    assert store.get(job.id).state is S.QUEUED


def test_retrying_counts_attempts_and_running_keeps_first_start(store):
    job = store.submit(minilm_spec())
    store.transition(job.id, S.RUNNING)
    started = store.get(job.id).started_at
    store.transition(job.id, S.RETRYING, reason="node lost")
    job = store.transition(job.id, S.RUNNING)
    assert job.attempt == 1 and job.started_at == started
    failed = store.transition(job.id, S.FAILED, error="boom", traceback="Traceback ...")
    assert (failed.error, failed.traceback) == ("boom", "Traceback ...")
