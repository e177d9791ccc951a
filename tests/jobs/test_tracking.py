"""Experiment tracking (jobs.tracking): a real recipe wrapped in a TrackedReporter logs to a real MLflow store
(SQLite) and to TensorBoard event files; everything is read back through MLflow's own client and
TensorBoard's EventAccumulator, never through our code.

The recipe runs in a fresh process (``python -m tests.jobs.test_tracking RUNS_JSON OUT_JSON``: a one-rank gloo
group, an in-memory reporter, as tests/jobs/recipe_runs.py does), once per module for every run it needs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.spec import JobSpecError, parse_job_spec
from jobs.sweep_spec import parse_sweep_spec, trial_spec
from jobs.tracking import JOB_TAG, PARENT_TAG, SWEEP_TAG, RunTracking, TrackedReporter, TrackingSpec, end_job_run
from jobs.training.reporter import InMemoryReporter
from tests.conftest import save_tiny_bert

ROOT = Path(__file__).resolve().parents[2]
JOB_ID = "a1b2c3d4" * 4
DOWN_ID = "d0d0d0d0" * 4
DOWN = "http://127.0.0.1:9"  # the discard port: nothing listens


def spec_for(base: str, tracking: dict | None = None, **training) -> dict:
    return {
        "name": "tracked", "base_model": base, "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 32}, "method": {"method": "lora", "r": 4},
        "training": {"batch_size": 8, "lr": 0.01, "eval_size": 16, "max_length": 32, "eval_every_steps": 2,
                     **training},
        **({"tracking": tracking} if tracking else {}),
    }


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite tracking store per module (MLflow's migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


def experiment(uri: str, name: str, artifacts: Path) -> str:
    """A fresh experiment whose artifacts land under ``artifacts`` (never the cwd's ./mlruns)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).create_experiment(name, artifact_location=artifacts.as_uri())


def runs_of(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return [] if found is None else client.search_runs([found.experiment_id])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same steps, the same values (to float32's precision)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx(
        [v for _, v in want], rel=1e-6)


# -- a real recipe, tracked ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_db):
    """Two tracked recipe runs in one fresh process: one logging to MLflow and TensorBoard, one whose MLflow
    server is down (nothing listens) and must train all the same."""
    tmp = tmp_path_factory.mktemp("tracked")
    base = str(save_tiny_bert(tmp / "tiny-bert"))
    experiment(mlflow_db, "recipe", tmp / "artifacts")
    good = spec_for(base, {"mlflow": {"uri": mlflow_db, "experiment": "recipe", "tags": {"team": "nlp"}},
                           "tensorboard": {"dir": str(tmp / "tb")}})
    down = spec_for(base, {"mlflow": {"uri": DOWN, "experiment": "recipe"}})
    runs, out = tmp / "runs.json", tmp / "out.json"
    runs.write_text(json.dumps([[good, JOB_ID], [down, DOWN_ID]]))
    # MLflow would retry a refused connection for minutes: once is enough to see it down
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    done = subprocess.run([sys.executable, "-m", "tests.jobs.test_tracking", str(runs), str(out)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp / "mlruns").exists()  # nothing landed in the worker's cwd
    results = json.loads(out.read_text())
    return {"tmp": tmp, "good": results[0], "down": results[1], "stderr": done.stderr}


def test_params_metrics_and_the_adapter_reach_mlflow(trained, mlflow_db):
    from mlflow.tracking import MlflowClient

    (run,) = runs_of(mlflow_db, "recipe")  # the down server's job logged nowhere
    client = MlflowClient(mlflow_db)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    params = run.data.params
    assert params["job_id"] == JOB_ID and params["method.method"] == "lora" and params["method.r"] == "4"
    assert params["training.lr"] == "0.01" and params["dataset.name"] == "trec" and params["task"].startswith("seq")
    assert "tracking.mlflow.uri" not in params
    tags = run.data.tags
    assert tags[JOB_TAG] == JOB_ID and tags["team"] == "nlp" and tags["peftfleet.adapter"] == "adapter-1"
    recorded = trained["good"]["recorded"]  # what the inner reporter (the store's stand-in) was told
    losses = [(step, value) for step, name, value in recorded if name == "train_loss"]
    assert len(losses) == 4 and same(history(mlflow_db, run.info.run_id, "train_loss"), losses)
    evals = [(step, value) for step, name, value in recorded if name == "eval_accuracy"]
    assert [s for s, _ in evals] == [2, 4]
    assert same(history(mlflow_db, run.info.run_id, "eval_accuracy"), evals)  # once per evaluation
    assert [s for s, _ in history(mlflow_db, run.info.run_id, "total_steps")] == [0]
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftfleet.json"} <= files
    local = client.download_artifacts(run.info.run_id, "adapter/peftfleet.json", str(trained["tmp"] / "dl"))
    assert json.loads(Path(local).read_text())["metadata"]["job_id"] == JOB_ID
    assert str(trained["tmp"] / "artifacts") in run.info.artifact_uri  # where the experiment said


def test_tensorboard_event_files_hold_the_same_curves(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = (trained["tmp"] / "tb").iterdir()
    assert folder.name == f"tracked-{JOB_ID[:8]}"
    events = EventAccumulator(str(folder))
    events.Reload()
    recorded = trained["good"]["recorded"]
    losses = [(step, value) for step, name, value in recorded if name == "train_loss"]
    assert same([(e.step, e.value) for e in events.Scalars("train_loss")], losses)
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]


def test_a_tracker_that_is_down_does_not_fail_training(trained):
    down = trained["down"]
    assert down["adapter"] == "adapter-1" and [k for k, _ in down["events"]][-1] == "finished"
    warnings = [line for line in trained["stderr"].splitlines() if "mlflow tracking of job d0d0d0d0 failed" in line]
    assert len(warnings) == 1, trained["stderr"][-3000:]  # said once, not per call


# -- resume, sweeps: the reporter on its own (no recipe) -------------------------------------------------------
def job_spec(tracking: dict | None, **over):
    return parse_job_spec({"name": "unit", "base_model": "minilm", "task": "sequence-classification",
                           "dataset": {"name": "trec"}, "method": {"method": "lora"}, **over,
                           **({"tracking": tracking} if tracking is not None else {})})


def attempt(spec, job_id: str, *, start: int, steps: range, fail: bool = False) -> InMemoryReporter:
    inner = InMemoryReporter(job_id=job_id)
    try:
        with TrackedReporter(inner, spec, job_id, voice=True) as tracked:
            tracked.started(step=start, total_steps=4, resumed=start > 0, summary={"total_steps": 4})
            for step in steps:
                tracked.metrics(step, {"train_loss": 1.0 / step})
            if fail:
                raise RuntimeError("a worker died")
            tracked.finished(steps[-1], {}, None)
    except RuntimeError:
        pass
    return inner


def test_a_new_attempt_continues_the_same_run_and_a_failure_ends_it_failed(tmp_path, mlflow_db):
    experiment(mlflow_db, "resume", tmp_path)
    spec = job_spec({"mlflow": {"uri": mlflow_db, "experiment": "resume"}})
    attempt(spec, "job-1", start=0, steps=range(1, 3), fail=True)
    (run,) = runs_of(mlflow_db, "resume")
    assert run.info.status == "FAILED"
    inner = attempt(spec, "job-1", start=2, steps=range(3, 5))
    (run,) = runs_of(mlflow_db, "resume")  # still one run: the attempt continued it
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(mlflow_db, run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert history(mlflow_db, run.info.run_id, "resumed_from_step") == [(2, 2.0)]
    assert inner.values("train_loss") == [(3, 1 / 3), (4, 0.25)]  # forwarded unchanged


def test_only_the_voice_logs(tmp_path, mlflow_db):
    experiment(mlflow_db, "ranks", tmp_path)
    spec = job_spec({"mlflow": {"uri": mlflow_db, "experiment": "ranks"}})
    inner = InMemoryReporter()
    with TrackedReporter(inner, spec, "job-2", voice=False) as tracked:  # rank 1 of a data-parallel job
        tracked.started(step=0, total_steps=1, resumed=False, summary={})
        tracked.metrics(1, {"train_loss": 0.5})
        tracked.finished(1, {}, None)
    assert runs_of(mlflow_db, "ranks") == [] and inner.values("train_loss") == [(1, 0.5)]


def test_a_sweep_is_one_parent_run_with_a_child_per_trial(tmp_path, mlflow_db):
    experiment(mlflow_db, "sweep", tmp_path)
    base = {"name": "unit", "base_model": "minilm", "task": "sequence-classification", "dataset": {"name": "trec"},
            "method": {"method": "lora"}}
    sweep = parse_sweep_spec({"name": "sw", "spec": base, "search_space": {"method.r": {"grid": [2, 4]}},
                              "tracking": {"mlflow": {"uri": mlflow_db, "experiment": "sweep"}}})
    parent = RunTracking(sweep.tracking, key=(SWEEP_TAG, "sweep-1"), run_name="sw")
    run_id = parent.open({"metric": "eval_accuracy"})
    for i, r in enumerate([2, 4]):
        spec = trial_spec(sweep, {"method.r": r}, i, sweep_id="sweep-1", parent_run_id=run_id)
        assert spec.tracking.mlflow.parent_run_id == run_id
        attempt(spec, f"trial-{i}", start=0, steps=range(1, 2))
    for i in (2, 3):  # two trials whose workers were killed mid-training: their runs never ended
        spec = trial_spec(sweep, {"method.r": 8}, i, sweep_id="sweep-1", parent_run_id=run_id)
        killed = TrackedReporter(InMemoryReporter(), spec, f"trial-{i}", voice=True)
        killed.started(step=0, total_steps=4, resumed=False, summary={"total_steps": 4})
        killed.close(None)
    end_job_run(sweep.tracking, "trial-2", "KILLED")  # its sweep's scheduler stopped it
    assert {r.data.tags[JOB_TAG]: r.info.status for r in runs_of(mlflow_db, "sweep") if JOB_TAG in r.data.tags} == {
        "trial-0": "FINISHED", "trial-1": "FINISHED", "trial-2": "KILLED", "trial-3": "RUNNING"}
    parent.close("FINISHED", children="KILLED")  # the sweep is over: what still runs was stopped
    again = RunTracking(sweep.tracking, key=(SWEEP_TAG, "sweep-1"), run_name="sw")
    assert again.open({}) == run_id  # a resumed sweep reuses its parent run
    again.close("FINISHED")
    runs = runs_of(mlflow_db, "sweep")
    children = {r.data.tags[JOB_TAG]: r for r in runs if r.data.tags.get(PARENT_TAG) == run_id}
    assert len(runs) == 5 and sorted(r.data.params["method.r"] for r in children.values()) == ["2", "4", "8", "8"]
    assert {job: r.info.status for job, r in children.items()} == {
        "trial-0": "FINISHED", "trial-1": "FINISHED", "trial-2": "KILLED", "trial-3": "KILLED"}
    assert next(r for r in runs if r.info.run_id == run_id).info.status == "FINISHED"


def test_a_tracker_that_fails_mid_job_is_warned_about_once(tmp_path, caplog):
    """TensorBoard into a folder that cannot be created (a file is in the way)."""
    spec = job_spec({"tensorboard": {"dir": str(tmp_path / "blocked-later")}})
    (tmp_path / "blocked-later").write_text("")  # the folder became a file after validation
    inner = InMemoryReporter()
    with caplog.at_level(logging.WARNING, logger="peftfleet.tracking"):
        with TrackedReporter(inner, spec, "job-3", voice=True) as tracked:
            tracked.started(step=0, total_steps=2, resumed=False, summary={})
            for step in (1, 2):
                tracked.metrics(step, {"train_loss": 0.5})
            tracked.finished(2, {}, None)
    assert len([r for r in caplog.records if "tensorboard tracking of job job-3 failed" in r.message]) == 1
    assert inner.values("train_loss") == [(1, 0.5), (2, 0.5)]


class Flaky:
    """A tracker (jobs.tracking.Tracker) whose backend accepts the run, then refuses every metric."""

    name = "flaky"

    def __init__(self):
        self.calls: list[str] = []

    def open(self, params, step):
        self.calls.append("open")

    def log_metrics(self, step, values):
        self.calls.append(f"metrics {step}")
        raise ConnectionError("the server went away")

    def log_artifacts(self, folder, path):
        self.calls.append("artifacts")

    def set_tags(self, tags):
        self.calls.append("tags")

    def close(self, status):
        self.calls.append(status)


def test_a_tracker_failing_after_it_opened_is_warned_about_once_then_dropped(caplog):
    from jobs.tracking import MAX_FAILURES

    flaky, inner = Flaky(), InMemoryReporter()
    with caplog.at_level(logging.WARNING, logger="peftfleet.tracking"):
        with TrackedReporter(inner, job_spec(None), "job-4", voice=True, trackers=[flaky]) as tracked:
            tracked.started(step=0, total_steps=6, resumed=False, summary={})
            for step in range(1, 7):
                tracked.metrics(step, {"train_loss": 0.5})
            tracked.finished(6, {}, None)
    # the summary's metrics were empty: the first metric call is step 1; the tracker is dropped after MAX_FAILURES
    assert flaky.calls == ["open", *[f"metrics {s}" for s in range(1, MAX_FAILURES + 1)]]
    assert len([r for r in caplog.records if "flaky tracking of job job-4 failed" in r.message]) == 1
    assert len(inner.values("train_loss")) == 6


# -- specs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tracking, field, words", [
    ({"mlflow": {"uri": "ftp://host/x"}}, "tracking.mlflow.uri", "unsupported scheme"),
    ({"mlflow": {"uri": "mlruns"}}, "tracking.mlflow.uri", "not a URI"),
    ({"mlflow": {"uri": "sqlite:///:memory:"}}, "tracking.mlflow.uri", "names a file"),
    ({"mlflow": {"uri": "https://user:secret@mlflow.example"}}, "tracking.mlflow.uri", "MLFLOW_TRACKING_PASSWORD"),
    ({"mlflow": {"uri": "http://"}}, "tracking.mlflow.uri", "names no server"),
    ({"mlflow": {"uri": "sqlite:///m.db", "tags": {"mlflow.parentRunId": "x"}}}, "tracking.mlflow.tags", "mlflow."),
    ({"mlflow": {"uri": "sqlite:///m.db", "parent_run_id": "../x"}}, "tracking.mlflow.parent_run_id", "run id"),
    ({"mlflow": {"uri": "sqlite:///m.db", "experiment": ""}}, "tracking.mlflow.experiment", "at least 1"),
    ({"tensorboard": {"dir": "s3://bucket/tb"}}, "tracking.tensorboard.dir", "not a URL"),
    ({"tensorboard": {}}, "tracking.tensorboard.dir", "Field required"),
    ({}, "tracking", "at least one tracker"),
    ({"wandb": {}}, "tracking.wandb", "Extra inputs"),
])
def test_bad_tracking_is_refused_naming_the_field(tracking, field, words):
    with pytest.raises(JobSpecError) as e:
        job_spec(tracking)
    ((path, message),) = e.value.problems
    assert path == field and words in message


def test_a_file_in_the_way_of_the_tensorboard_folder_is_refused(tmp_path):
    (tmp_path / "tb").write_text("")
    with pytest.raises(JobSpecError, match="tracking.tensorboard.dir: .* is not a folder"):
        job_spec({"tensorboard": {"dir": str(tmp_path / "tb")}})


def test_without_mlflow_installed_the_spec_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    with pytest.raises(JobSpecError, match=r"tracking.mlflow.uri: .*pip install 'peftfleet\[tracking\]'"):
        job_spec({"mlflow": {"uri": "sqlite:///m.db"}})


def test_local_uris_and_folders_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # workers run elsewhere: what the submitter meant is fixed at validation
    spec = job_spec({"mlflow": {"uri": "sqlite:///db/m.db"}, "tensorboard": {"dir": "tb"}})
    assert spec.tracking.mlflow.uri == f"sqlite:///{tmp_path}/db/m.db"
    assert spec.tracking.mlflow.default_artifacts() == (tmp_path / "db" / "mlartifacts").as_uri()
    assert spec.tracking.tensorboard.dir == str(tmp_path / "tb")
    assert job_spec({"mlflow": {"uri": "file:runs"}}).tracking.mlflow.uri == (tmp_path / "runs").as_uri()
    assert parse_job_spec(spec.model_dump(mode="json")) == spec  # a stored spec reads back the same


def test_a_sweeps_tracking_reaches_every_trial_and_bad_sweep_tracking_names_the_field():
    base = {"name": "unit", "base_model": "minilm", "task": "sequence-classification", "dataset": {"name": "trec"},
            "method": {"method": "lora"}, "tracking": {"tensorboard": {"dir": "/tmp/own"}}}
    sweep = parse_sweep_spec({"name": "sw", "spec": base, "search_space": {"method.r": {"grid": [2, 4]}},
                              "tracking": {"mlflow": {"uri": "http://mlflow:5000"}}})
    spec = trial_spec(sweep, {"method.r": 2}, 0, parent_run_id="abc123")
    assert spec.tracking.mlflow.uri == "http://mlflow:5000" and spec.tracking.tensorboard is None  # the sweep's wins
    assert spec.tracking.mlflow.parent_run_id == "abc123"
    no_sweep_tracking = parse_sweep_spec({"name": "sw", "spec": base, "search_space": {"method.r": {"grid": [2]}}})
    assert trial_spec(no_sweep_tracking, {"method.r": 2}, 0).tracking.tensorboard.dir == "/tmp/own"
    with pytest.raises(JobSpecError, match="tracking.mlflow.uri: unsupported scheme"):
        parse_sweep_spec({"name": "sw", "spec": base, "search_space": {"method.r": {"grid": [2]}},
                          "tracking": {"mlflow": {"uri": "gopher://x"}}})


def test_tracking_never_keeps_jobs_out_of_one_base_group():
    from jobs.training.base_group import GroupKey, packing_problem

    plain = job_spec(None)
    tracked = job_spec({"mlflow": {"uri": "http://mlflow:5000"}, "tensorboard": {"dir": "/tmp/tb"}})
    assert GroupKey.of(tracked, "sha256:x") == GroupKey.of(plain, "sha256:x")
    assert packing_problem(tracked) is None and packing_problem(plain) is None


def test_the_client_default_applies_to_specs_that_name_none(tmp_path):
    from orchestrator.client import Client

    client = Client(store_url=f"sqlite:///{tmp_path / 'store.db'}", home=tmp_path / "home",
                    tracking={"mlflow": {"uri": "http://mlflow:5000", "experiment": "team"}})
    assert client.with_tracking(job_spec(None)).tracking == TrackingSpec.model_validate(
        {"mlflow": {"uri": "http://mlflow:5000", "experiment": "team"}})
    own = job_spec({"tensorboard": {"dir": "/tmp/tb"}})
    assert client.with_tracking(own) is own
    assert Client(store_url=f"sqlite:///{tmp_path / 'store.db'}", home=tmp_path / "home").with_tracking(
        job_spec(None)).tracking is None
    with pytest.raises(JobSpecError, match="tracking.mlflow.uri"):
        Client(store_url=f"sqlite:///{tmp_path / 'store.db'}", home=tmp_path / "home",
               tracking={"mlflow": {"uri": "nope"}})


# -- the recipe runs (in a fresh process) ------------------------------------------------------------------------
def main() -> None:
    import socket

    import torch.distributed as dist

    from jobs.training.recipe import Recipe

    logging.basicConfig(level=logging.WARNING)
    runs_path, out_path = sys.argv[1], sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    results = []
    for raw, job_id in json.loads(Path(runs_path).read_text()):
        spec = parse_job_spec(raw)
        inner = InMemoryReporter(job_id=job_id)
        with TrackedReporter(inner, spec, job_id, voice=True) as tracked:
            name = Recipe(spec, tracked, metadata={"base_fingerprint": "sha256:test", "job_id": job_id}).run()
        results.append({"adapter": name, "events": inner.events, "recorded": inner.recorded})
    Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
