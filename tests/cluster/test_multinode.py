"""peftfleet on a real multi-node Ray cluster (a head and two worker nodes, each its own raylet):
placement across nodes, queueing when the cluster is full, a lost node during training, and a
job whose driver was killed."""

from __future__ import annotations

import os
import signal
import time

from jobs.states import JobState
from tests.cluster.conftest import add_worker_node, worker_nodes


def _wait_for_step(client, job_id: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(m.step >= step for m in client.store.metrics(job_id, "train_loss")):
        job = client.store.get(job_id)
        assert not job.state.is_terminal, f"{job.state}: {job.error}"
        assert time.monotonic() < deadline, f"job {job_id[:8]} did not reach step {step}"
        time.sleep(0.2)


def _first(events, state: JobState) -> float:
    return next(e.at for e in events if e.to_state is state)


def test_a_spread_job_uses_both_worker_nodes_and_a_job_that_does_not_fit_waits(client, spec):
    spread = client.submit(spec("spread", workers=2, epochs=4))  # both CPUs of the cluster, one per node
    waiting = client.submit(spec("waiting"))  # one more CPU: the two cannot run at once
    a, b = spread.wait(timeout=600, progress=False), waiting.wait(timeout=600, progress=False)
    assert a.state is JobState.SUCCEEDED and b.state is JobState.SUCCEEDED, (a.error, b.error)
    nodes = a.runtime["worker_nodes"]
    assert len(nodes) == 2 and set(nodes) == worker_nodes(), nodes  # one worker on each worker node
    assert spread.adapter() is not None and waiting.adapter() is not None
    events_a, events_b = client.store.events(a.id), client.store.events(b.id)
    (ra, sa), (rb, sb) = ((_first(ev, JobState.RUNNING), _first(ev, JobState.SUCCEEDED)) for ev in (events_a, events_b))
    # Never both training: whichever Ray scheduled second waited in the queue until the other was done.
    assert rb >= sa - 1.0 or ra >= sb - 1.0, (ra, sa, rb, sb)


def test_a_job_whose_driver_is_killed_is_resubmitted_and_resumes_from_its_checkpoint(client, spec):
    client.resubmit_orphans = 1
    handle = client.submit(spec("orphan", epochs=12, checkpoint_every_steps=8))
    _wait_for_step(client, handle.id, 24)
    submission = handle.record().runtime["ray_submission_id"]
    pid = client.cluster.jobs_client().get_job_info(submission).driver_info.pid
    os.kill(int(pid), signal.SIGKILL)  # the process that owns the job dies without a word
    job = handle.wait(timeout=600, progress=False)
    assert job.state is JobState.SUCCEEDED, job.error
    events = client.store.events(job.id)
    assert any(e.to_state is JobState.RETRYING and "resubmitted (attempt 1 of 1)" in e.reason for e in events), events
    resumed = handle.metrics("resumed_from_step")
    assert resumed and resumed[-1].value >= 8, "the new owner started over instead of resuming"
    assert job.attempt == 1 and handle.adapter() is not None


def test_losing_a_worker_node_mid_job_resumes_on_the_remaining_node(cluster, client, spec, monkeypatch):
    monkeypatch.setenv("PEFTFLEET_MAX_FAILURES", "2")  # passed to the job's Ray Train FailureConfig
    handle = client.submit(spec("survivor", epochs=12, checkpoint_every_steps=8))
    _wait_for_step(client, handle.id, 24)
    [node_id] = handle.record().runtime["worker_nodes"]
    lost = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    try:
        cluster.remove_node(lost)
        job = handle.wait(timeout=600, progress=False)
        assert job.state is JobState.SUCCEEDED, job.error
        assert handle.record().runtime["worker_nodes"] != [node_id]  # finished on the other node
        events = [e for e in client.store.events(job.id)]
        retry = next(e for e in events if e.to_state is JobState.RETRYING)
        assert "worker group restarted after a failure; resumed from the checkpoint at step" in retry.reason
        assert handle.metrics("resumed_from_step")[-1].value >= 8
        assert handle.adapter() is not None
    finally:
        add_worker_node(cluster)  # restore capacity
        cluster.wait_for_nodes()


def test_peftfleet_run_owns_a_job_in_its_own_process_as_a_rayjob_entrypoint_does(client, spec, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main as cli

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec("entrypoint")))
    code = cli(
        [
            "run",
            str(path),
            "--store-url",
            client.store.url,
            "--storage-url",
            client.store.artifacts.url,
            "--home",
            str(client.home),
        ]
    )
    out = capsys.readouterr().out
    [job] = client.jobs.list(name="entrypoint")
    assert code == 0 and job.state is JobState.SUCCEEDED and f"job {job.id[:12]} SUCCEEDED; adapter entrypoint-" in out
    assert [e.to_state for e in client.store.events(job.id)] == [
        JobState.PENDING,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
