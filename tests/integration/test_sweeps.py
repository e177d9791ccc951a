"""Hyper-parameter sweeps on the local Ray cluster: every trial a job, ASHA stopping weak ones early
(recorded STOPPED), the best adapter registered and promoted, bad spaces refused up front, and a
sweep whose driver died resumed with its finished trials kept and the best of all its trials (not the
last one standing) picked and promoted."""

from __future__ import annotations

import re
import time

import pytest
import ray
import transformers
from mlflow.tracking import MlflowClient

from jobs.spec import JobSpecError
from jobs.states import JobState
from jobs.sweep_spec import draw, parse_sweep_spec
from jobs.tracking import JOB_TAG, PARENT_TAG, SWEEP_TAG
from orchestrator.cli import main as cli

GOOD, BAD = 0.05, 1e-7  # a learning rate that learns in a few steps, and one that cannot


def _spec(tiny_spec):
    return tiny_spec(
        training={"eval_every_steps": 8, "epochs": 1}, resources={"num_workers": 1, "cpus_per_worker": 0.9}
    )


def _seed_with(order: list[float], space: dict, base: dict, n: int) -> int:
    """A seed whose first draws come in ``order`` (so the test knows which trial runs first)."""
    for seed in range(500):
        drawn = draw(
            parse_sweep_spec({"name": "probe", "spec": base, "search_space": space, "num_samples": n, "seed": seed})
        )
        if [d["training.lr"] for d in drawn[: len(order)]] == order:
            return seed
    raise AssertionError("no seed gives that order")


def test_asha_sweep_records_every_trial_stops_weak_ones_and_promotes_the_best(
    client, tiny_spec, tiny_bert_dir, tmp_path, capsys
):
    # tracked in MLflow (the job spec's tracking; a real SQLite store): one parent run, a child per trial
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(mlflow_uri).create_experiment("asha", artifact_location=(tmp_path / "mlartifacts").as_uri())
    base = {**_spec(tiny_spec), "tracking": {"mlflow": {"uri": mlflow_uri, "experiment": "asha"}}}
    space = {"training.lr": {"choice": [GOOD, BAD]}}
    seed = _seed_with([GOOD, BAD, BAD], space, base, 3)
    sweep = client.tune(base, search_space=space, metric="eval_loss", mode="min", num_samples=3, scheduler="asha",
                        max_concurrent=1, seed=seed, promote=True, name="asha-sweep",
                        scheduler_options={"grace_period": 1, "reduction_factor": 2})
    record = sweep.wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, trials)
    assert len(trials) == 3 and {t["job"] for t in trials} == {t.job.id for t in client.store.sweeps.trials(sweep.id)}
    states = {t["params"]["training.lr"]: t["state"] for t in trials if t["params"]["training.lr"] == GOOD}
    assert states == {GOOD: "SUCCEEDED"}
    stopped = [t for t in trials if t["state"] == "STOPPED"]
    assert stopped and all(t["params"]["training.lr"] == BAD for t in stopped), trials
    groups = ray.util.placement_group_table()
    for t in stopped:  # early-stopped: no adapter, said so (not a failure), and its workers' resources given back
        assert client.adapters.list(job_id=t["job"]) == []
        assert "stopped early by ASHA" in client.store.events(t["job"])[-1].reason
        pg = client.store.get(t["job"]).runtime.get("placement_group")
        assert pg is None or groups[pg]["state"] == "REMOVED"
    assert not [t for t in trials if t["state"] == "FAILED"]

    good = next(t for t in trials if t["params"]["training.lr"] == GOOD)  # the only trial that finished: the
    # best by construction; choosing among finished trials is checked by the resume test below
    assert record.best_job_id == good["job"] and record.best_value == good["eval_loss"]
    adapter = client.adapters.get(record.best_adapter)
    assert adapter.job_id == good["job"] and adapter.promoted
    base_model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=6)
    client.adapters.load(adapter.name, base_model)  # hash- and base-checked

    evaluated = [m.step for m in client.store.metrics(good["job"], "eval_loss")]
    _assert_tracked_as_parent_and_children(mlflow_uri, sweep.id, trials, good["job"], evaluated)

    png = sweep.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["sweep", "show", sweep.id[:8], "--home", str(client.home)]) == 0
    out = capsys.readouterr().out
    assert "STOPPED" in out and f"best: {adapter.name}" in out


def _assert_tracked_as_parent_and_children(uri: str, sweep_id: str, trials: list[dict], finished: str,
                                           evaluated: list[int]) -> None:
    """Read back through MLflow's own client: the sweep's run, one child run per trial (the finished trial's
    FINISHED with its metrics and adapter, the stopped ones KILLED), all of them ended."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("asha").experiment_id
    deadline = time.monotonic() + 60  # runs end just after their jobs settle
    while True:
        runs = client.search_runs([experiment])
        if all(r.info.status != "RUNNING" for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (parent,) = [r for r in runs if r.data.tags.get(SWEEP_TAG) == sweep_id]
    children = {r.data.tags[JOB_TAG]: r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    assert len(runs) == 1 + len(trials) and set(children) == {t["job"] for t in trials}, runs
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_eval_loss"] > 0
    good = children[finished]
    assert good.info.status == "FINISHED" and good.data.params["training.lr"] == str(GOOD)
    assert [m.step for m in client.get_metric_history(good.info.run_id, "eval_loss")] == evaluated
    assert "adapter/adapter_model.safetensors" in {f.path for f in client.list_artifacts(good.info.run_id, "adapter")}
    assert {r.info.status for job, r in children.items() if job != finished} == {"KILLED"}


def test_an_invalid_search_space_is_refused_before_any_trial(client, tiny_spec):
    jobs_before, ray_jobs_before = client.store.count_jobs(), len(client.cluster.jobs_client().list_jobs())
    for space, message in [({"training.lr": {"loguniform": [0, 0.1]}}, "low > 0"),
                           ({"method.rank": {"choice": [4]}}, "Extra inputs are not permitted")]:
        with pytest.raises(JobSpecError, match=message):
            client.tune(_spec(tiny_spec), search_space=space, num_samples=2)
    assert client.store.sweeps.list() == [] and client.store.count_jobs() == jobs_before
    assert len(client.cluster.jobs_client().list_jobs()) == ray_jobs_before


def _best_of_all_trials(client, sweep) -> tuple[str, float, str]:
    """(job, final eval_loss, adapter) of the best finished trial, computed here from every trial job's
    recorded metrics (which must agree with the metrics its adapter was registered with), not the sweep's."""
    final, adapter_of = {}, {}
    for t in client.store.sweeps.trials(sweep.id):
        losses = client.store.metrics(t.job.id, "eval_loss")
        (adapter,) = client.adapters.list(job_id=t.job.id)
        assert losses and adapter.metrics["eval_loss"] == losses[-1].value, (t.job.name, losses, adapter.metrics)
        final[t.job.id], adapter_of[t.job.id] = losses[-1].value, adapter.name
    best = min(final, key=final.get)
    assert sorted(final.values())[1] > final[best], final  # one best, no tie
    return best, final[best], adapter_of[best]


def test_a_sweep_whose_driver_died_resumes_keeping_finished_trials_and_picks_the_best_of_all(client, tiny_spec):
    # FIFO over a fixed grid, one trial at a time: a slow learning rate finishes before the driver dies; the
    # one that learns, then one that cannot, run after the resume. The best must be picked over all three,
    # though it is neither the first trial to finish nor the last one standing.
    lrs = [1e-3, GOOD, BAD]
    sweep = client.tune(_spec(tiny_spec), search_space={"training.lr": {"grid": lrs}}, metric="eval_loss",
                        mode="min", scheduler="fifo", max_concurrent=1, promote=True, name="resumable")
    deadline = time.monotonic() + 600
    while not any(t["state"] == "SUCCEEDED" for t in sweep.trials()):
        assert time.monotonic() < deadline, sweep.trials()
        time.sleep(1)
    first = next(t for t in sweep.trials() if t["state"] == "SUCCEEDED")
    jobs_client = client.cluster.jobs_client()
    jobs_client.stop_job(sweep.record().runtime["ray_submission_id"])  # the driver dies mid-sweep
    assert sweep.wait(timeout=300).state == "INTERRUPTED"

    record = sweep.resume().wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, trials)
    assert len(trials) == 3 and all(t["state"] == "SUCCEEDED" for t in trials), trials
    events = [e.to_state for e in client.store.events(first["job"])]
    assert events.count(JobState.SUCCEEDED) == 1 and events.count(JobState.RUNNING) == 1  # not run again

    best, value, adapter = _best_of_all_trials(client, sweep)
    ends = [t["job"] for t in sorted(trials, key=lambda t: client.store.get(t["job"]).finished_at)]
    assert best not in (ends[0], ends[-1]), ([(t["params"], t["eval_loss"]) for t in trials], ends)  # the premise
    assert (record.best_job_id, record.best_value, record.best_adapter) == (best, value, adapter)
    assert sweep.best() == {"job": best, "eval_loss": value, "adapter": adapter}
    assert [a.name for a in client.adapters.list(promoted=True)] == [adapter]  # promoted, and no other


@pytest.mark.parametrize("packing", ["off", "auto"])  # auto: its trials train in one base group
def test_pbt_continues_weak_trials_from_strong_ones_checkpoints(client, tiny_spec, packing):
    # The head's rate: what sets these trials apart within a few steps (the tiny model's LoRA rate barely
    # moves its loss). Trials report in turn, each against the others' previous evaluations, so only a
    # trial clearly behind is ever in PBT's lower quantile when it reports.
    space = {"training.head_lr": {"loguniform": [1e-6, 0.05]}}
    sweep = client.tune(
        {**_spec(tiny_spec), "packing": packing},
        search_space=space,
        metric="eval_loss",
        mode="min",
        num_samples=4,
        scheduler="pbt",
        max_concurrent=2,
        seed=1,
        name="pbt-sweep",
        scheduler_options={"perturbation_interval": 1},
    )
    record = sweep.wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, trials)
    continued = [t for t in trials if client.store.get(t["job"]).runtime.get("continues")]
    assert continued, f"PBT exploited nothing: {trials}"
    for t in continued:
        job = client.store.get(t["job"])
        donor = job.runtime["continues"]
        assert donor["job_id"] in {x["job"] for x in trials} and donor["step"] > 0
        assert client.store.metrics(job.id, "resumed_from_step")[0].value == donor["step"]  # not from scratch
        if packing == "auto":  # it continued in the donor's group, from the donor's packed checkpoint
            assert job.runtime["base_group"] == client.store.get(donor["job_id"]).runtime["base_group"]
            assert re.search(r"/packed/a\d+/step-\d+$", donor["path"]), donor["path"]
    # A continued trial's earlier job was held at the checkpoint PBT decided on (it never trained past it,
    # however fast it trains) and then cut short: STOPPED (CANCELLED had it not started), no adapter.
    jobs_of: dict[str, list] = {}
    for t in trials:
        jobs_of.setdefault(t["trial"], []).append(client.store.get(t["job"]))
    replaced = [j for jobs in jobs_of.values() for j in sorted(jobs, key=lambda j: j.created_at)[:-1]]
    assert replaced, trials
    for j in replaced:
        assert j.state.value in ("STOPPED", "CANCELLED"), (j.name, j.state, j.error)
        assert not client.adapters.list(job_id=j.id)
        trained = max((m.step for m in client.store.metrics(j.id, "train_loss")), default=0)
        held_at = max((m.step for m in client.store.metrics(j.id, "checkpoint_step")), default=0)
        assert trained <= held_at, (j.name, trained, held_at)
    assert record.best_adapter and not [t for t in trials if t["state"] == "FAILED"]
