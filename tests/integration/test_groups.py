"""Base groups on a real local Ray cluster: jobs of different methods train packed on one resident
base, join and leave it, and survive its death (see tests/jobs/test_base_group.py for the numbers)."""

from __future__ import annotations

import time

import ray
from mlflow.tracking import MlflowClient

from jobs.states import JobState
from jobs.tracking import JOB_TAG
from orchestrator.client import parse_tracking


def _packed(tiny_spec, name: str, method: dict, **training) -> dict:
    training = {"batch_size": 8, "eval_size": 32, "max_length": 24, **training}
    spec = tiny_spec(name=name, packing="auto", training=training, dataset={"name": "trec", "train_size": 128})
    return {**spec, "method": method}


def _wait_running(client, handles, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(h.status() is JobState.RUNNING for h in handles):
        assert time.monotonic() < deadline, [h.record() for h in handles]
        assert not any(h.status().is_terminal for h in handles), [(h.record().state, h.record().error) for h in handles]
        time.sleep(0.2)


def test_jobs_of_different_methods_train_together_in_one_group_and_a_cancel_leaves_only_its_rows(
    client, tiny_spec, tmp_path
):
    # every job tracked in MLflow by the client's default (a real SQLite store), packed and solo alike
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(mlflow_uri).create_experiment("groups", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.tracking = parse_tracking({"mlflow": {"uri": mlflow_uri, "experiment": "groups"}})
    handles = [
        client.submit(_packed(tiny_spec, "g-lora", {"method": "lora", "r": 4}, epochs=4)),
        client.submit(_packed(tiny_spec, "g-bitfit", {"method": "bitfit"}, epochs=4)),
        client.submit(_packed(tiny_spec, "g-doomed", {"method": "bottleneck"}, epochs=50)),
    ]
    _wait_running(client, handles)
    groups = client.groups.list()
    assert len(groups) == 1 and sorted(groups[0]["members"]) == sorted(h.id for h in handles), groups
    group = groups[0]["name"]
    client.cancel(handles[2].id)
    records = [h.wait(timeout=600) for h in handles[:2]]
    assert [r.state for r in records] == [JobState.SUCCEEDED, JobState.SUCCEEDED], [r.error for r in records]
    assert handles[2].status() is JobState.CANCELLED
    for h in handles:
        assert h.record().runtime["base_group"] == group
        running = [e for e in client.store.events(h.id) if e.to_state is JobState.RUNNING]
        assert running and f"base group {group}" in running[0].reason
    for h in handles[:2]:
        adapter = h.adapter()
        assert adapter is not None and h.metrics("eval_accuracy")
    # One job could not pack and said why; it trained solo, meanwhile, on the same cluster.
    solo = client.submit({**tiny_spec(name="g-solo", packing="auto", training={"max_steps": 2, "eval_size": 16}),
                          "method": {"method": "lora", "r": 4, "dropout": 0.1}})
    assert solo.wait(timeout=600).state is JobState.SUCCEEDED
    queued = next(e for e in client.store.events(solo.id) if e.to_state is JobState.QUEUED)
    assert "runs solo: LoRA dropout" in queued.reason
    assert "base_group" not in solo.record().runtime
    runs = _ended_runs(mlflow_uri, "groups", 4)
    for h in [*handles[:2], solo]:  # members log as a solo job does: params, per-step metrics, the adapter
        run = runs[h.id]
        assert run.info.status == "FINISHED" and run.info.run_id == h.record().runtime["mlflow_run_id"]
        assert run.data.params["job_id"] == h.id and run.data.tags["peftfleet.adapter"] == h.adapter().name
        history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == [m.step for m in h.metrics("train_loss")]
        files = {f.path for f in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files
    assert runs[handles[2].id].info.status == "KILLED"  # cancelled: its rows left the group, its run ended


def _ended_runs(uri: str, experiment: str, count: int, timeout: float = 60) -> dict:
    """The experiment's runs by job id once ``count`` of them ended (a group ends them just after it settles
    their jobs)."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    deadline = time.monotonic() + timeout
    while True:
        runs = {r.data.tags[JOB_TAG]: r for r in client.search_runs([experiment_id])}
        if sum(r.info.status != "RUNNING" for r in runs.values()) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_a_job_survives_its_group_dying_and_resumes_from_its_own_checkpoint(client, tiny_spec):
    handle = client.submit(_packed(tiny_spec, "g-survivor", {"method": "lora", "r": 4}, epochs=40,
                                   checkpoint_every_steps=4, eval_every_steps=40))
    _wait_running(client, [handle])
    deadline = time.monotonic() + 300
    while not handle.metrics("checkpoint_step"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    name = handle.record().runtime["base_group"]
    ray.kill(ray.get_actor(name, namespace="peftfleet"), no_restart=True)  # the group's process dies
    record = handle.wait(timeout=600)
    assert record.state is JobState.SUCCEEDED, record.error
    states = [e.to_state for e in client.store.events(handle.id)]
    assert JobState.RETRYING in states and states.count(JobState.RUNNING) == 2, states
    resumed = handle.metrics("resumed_from_step")
    assert resumed and resumed[0].value >= 4 and resumed[0].value % 4 == 0
    assert handle.record().runtime["base_group"] == name  # the new group took the name: one per key at a time


def test_a_higher_priority_job_pauses_the_lowest_member_of_a_full_group(client, tiny_spec, monkeypatch):
    monkeypatch.setenv("PEFTFLEET_GROUP_MAX_MEMBERS", "2")  # read by the group the runners start
    low = [client.submit({**_packed(tiny_spec, f"g-low{i}", {"method": "lora", "r": 4}, epochs=30,
                                    checkpoint_every_steps=4, eval_every_steps=1000), "priority": -1})
           for i in range(2)]
    _wait_running(client, low)
    urgent = client.submit({**_packed(tiny_spec, "g-urgent", {"method": "bitfit"}, max_steps=6), "priority": 5})
    assert urgent.wait(timeout=600).state is JobState.SUCCEEDED, urgent.record().error
    records = [h.wait(timeout=900) for h in low]
    assert all(r.state is JobState.SUCCEEDED for r in records), [r.error for r in records]
    paused = [h for h in low if JobState.RETRYING in [e.to_state for e in client.store.events(h.id)]]
    assert len(paused) == 1, [[e.to_state for e in client.store.events(h.id)] for h in low]
    events = client.store.events(paused[0].id)
    states = [e.to_state for e in events]
    assert states[states.index(JobState.RETRYING) + 1] is JobState.QUEUED and states.count(JobState.RUNNING) == 2
    assert "for a job of priority 5" in next(e.reason for e in events if e.to_state is JobState.RETRYING)
    checkpointed = paused[0].metrics("resumed_from_step")
    assert checkpointed and checkpointed[0].value > 0  # it resumed where it paused, not from scratch
    # The urgent job started while the paused one waited: it ran before the paused one came back.
    urgent_start = next(e.at for e in client.store.events(urgent.id) if e.to_state is JobState.RUNNING)
    back = [e.at for e in events if e.to_state is JobState.RUNNING][1]
    assert urgent_start <= back
