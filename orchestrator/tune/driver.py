"""The process that owns one sweep on the cluster (a Ray job entrypoint):
`python -m orchestrator.tune.driver SWEEP_ID [--resume]`.

It runs Ray Tune over the sweep's drawn configurations. Each trial is a job in the store, run by
the same code as any job (:func:`orchestrator.runner.run`): as a member of the base group of its base
model when every trial can pack (a packed sweep: up to the group's member cap of trials train together
on one resident base, and a stopped trial's rows leave the group at its next step), else with Ray
Train workers and DeepSpeed of its own. The trial reports that job's evaluation metrics to Tune as
they reach the store, so ASHA can stop weak trials early. Under PBT every reported evaluation comes with a pointer to
that step's checkpoint in shared storage; a trial PBT restarts from another's checkpoint becomes a
new job starting from it with the perturbed values. A trial the scheduler stopped or paused
is recorded STOPPED, not FAILED. At the end the best finished trial's adapter is recorded on the
sweep (and promoted if asked). ``--resume`` continues a sweep whose driver died with
``Tuner.restore``: finished trials stay finished, a packed trial its base group still trains is
re-attached where it is, other interrupted ones start again (their jobs resume from their last
checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from jobs.spec import parse_job_spec
from jobs.states import TERMINAL, IllegalTransition, JobState
from jobs.store import JobStore, OwnershipLost
from jobs.store.sweep_registry import SweepChanged, SweepRecord
from jobs.sweep_spec import SweepSpec, draw, mutable, sweep_tracking, trial_spec
from jobs.tracking import SWEEP_TAG, RunTracking, end_job_run
from orchestrator.groups import holds, leave
from orchestrator.tune.pbt_hold import mark_decided
from orchestrator.tune.sweeps import packing

POLL_S = 1.0


def trial(config: dict[str, Any], sweep_id: str, submission_id: str | None) -> None:
    """One Tune trial: submit (or find again, after a restore) its job, run it, and report the job's
    evaluation metrics to Tune while it trains."""
    from ray import tune

    from orchestrator.runner import run

    store = JobStore()
    sweep = store.sweeps.get(sweep_id)
    spec: SweepSpec = sweep.sweep_spec
    index, params = config["trial"]["index"], config["trial"]["params"]
    trial_id = tune.get_context().get_trial_id()
    parent = sweep.runtime.get("mlflow_run_id")  # the sweep's MLflow run: the trial's run is its child
    start = _pbt_start(store, sweep_id, trial_id) if spec.scheduler == "pbt" else None
    if start is not None:  # a PBT exploit: this trial continues a better trial's job with perturbed values
        index = int(trial_id.rsplit("_", 1)[-1])
        job = _job_for(store, spec, params, index, sweep_id, lineage=f"{start['job_id'][:8]}-s{start['step']}",
                       parent_run_id=parent)
    else:
        job = _job_for(store, spec, params, index, sweep_id, parent_run_id=parent)
    store.sweeps.add_trial(sweep_id, job.id, trial_id, params)
    store.set_runtime(job.id, ray_submission_id=submission_id, sweep_id=sweep_id, trial_id=trial_id,
                      **({"continues": start} if start else {}))

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["state"] = run(job.id, f"sweep-{sweep_id[:8]}:{trial_id}", store=store,
                                   init_checkpoint=start["path"] if start else None)
        except BaseException as e:  # noqa: BLE001 - reported to Tune below
            outcome["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    if not store.get(job.id).state.is_terminal:
        worker.start()
    reported = 0
    key = (
        "checkpoint_step" if spec.scheduler == "pbt" else spec.metric
    )  # PBT: report only evaluations it can continue from
    while True:
        alive = worker.is_alive()
        rows = store.metrics(job.id, key)
        for m in rows[reported:]:
            if spec.scheduler == "pbt" and not alive:
                break  # the job is over: nothing left to continue from, only its final result counts
            value = next((v.value for v in reversed(store.metrics(job.id, spec.metric)) if v.step == m.step), None)
            result = {spec.metric: value, "step": m.step, "job_id": job.id}
            if spec.scheduler != "pbt":
                tune.report(result)
                continue
            if value is not None:  # returns once PBT let the trial go on (an exploit ends this thread here)
                with _pointer(store, job.id, m.step) as pointer:
                    tune.report(result, checkpoint=pointer)
            mark_decided(store, job.id, m.step)  # its job, held at that checkpoint, trains on
        reported = len(rows)
        if not alive:
            break
        time.sleep(POLL_S)
    rows = store.metrics(job.id, spec.metric)
    final = store.get(job.id)
    if final.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"trial job {job.id[:12]} ended {final.state}: {final.error or outcome.get('error')}")
    adapter = store.adapters.list(job_id=job.id)
    last = rows[-1].value if rows else float("nan")
    tune.report({spec.metric: last, "step": rows[-1].step if rows else 0, "job_id": job.id,
                 "adapter": adapter[0].name if adapter else "", "finished": 1})


@contextmanager
def _pointer(store: JobStore, job_id: str, step: int):
    """A Tune checkpoint that names the job's checkpoint at ``step`` (PBT copies checkpoints between
    trials: a pointer is all it needs to move). It holds the job id and step only: the folder is looked
    up in the store's checkpoint records when a trial starts from it, and verified before it is read.
    Its temporary folder is removed once Tune has persisted it (``report`` returns)."""
    import json
    import tempfile

    from ray import tune

    with tempfile.TemporaryDirectory(prefix="peftfleet-pbt-") as folder:
        Path(folder, "pointer.json").write_text(json.dumps({"job_id": job_id, "step": step}))
        yield tune.Checkpoint.from_directory(folder)


def _pbt_start(store: JobStore, sweep_id: str, trial_id: str) -> dict[str, Any] | None:
    """The checkpoint PBT restarted this trial from (another trial's job at some step), if any; the
    trial's previous job, cut short by the exploit, is recorded STOPPED."""
    import json

    from ray import tune

    from orchestrator.train_worker import checkpoint_at

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        pointer = json.loads(Path(folder, "pointer.json").read_text())
    job_id, step = pointer.get("job_id"), pointer.get("step")
    if not isinstance(job_id, str) or not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"PBT pointer.json: job_id must be a string and step an integer, not {pointer!r}"[:300])
    path = checkpoint_at(store, job_id, step)  # the store's record, never a path from Tune's storage
    if path is None:
        return None
    start = {"job_id": job_id, "step": step, "path": path}
    for t in store.sweeps.trials(sweep_id):
        if t.trial_id == trial_id and not t.job.state.is_terminal:
            _release(t.job, "PBT continues the trial from another's checkpoint")
            try:
                store.transition(
                    t.job.id,
                    JobState.STOPPED if t.job.state is JobState.RUNNING else JobState.CANCELLED,
                    reason=f"PBT exploit: continues from job {start['job_id'][:12]} at step {start['step']} "
                    "with perturbed values",
                )
            except IllegalTransition:
                pass
    return start


def _job_for(
    store: JobStore, spec: SweepSpec, params: dict[str, Any], index: int, sweep_id: str, lineage: str | None = None,
    parent_run_id: str | None = None,
):
    """The trial's job: new, or the one an earlier driver started (continued from its checkpoint)."""
    for attempt in range(100):
        job_spec = trial_spec(spec, params, index, sweep_id=sweep_id, parent_run_id=parent_run_id)
        if lineage:  # a PBT continuation is its own job
            job_spec = job_spec.model_copy(
                update={
                    "name": f"{job_spec.name}-{lineage}"[:64],
                    "idempotency_key": f"{job_spec.idempotency_key}-{lineage}",
                }
            )
        if attempt:
            job_spec = job_spec.model_copy(update={"idempotency_key": f"{job_spec.idempotency_key}-r{attempt}"})
        job = store.submit(job_spec)
        if job.state is JobState.PENDING or job.state is JobState.SUCCEEDED:
            return job
        if holds(job):  # its old driver died, its base group trains on: re-attach, lose nothing
            return job
        if job.state in (JobState.RUNNING, JobState.QUEUED, JobState.RETRYING):  # its old driver died
            target = JobState.RETRYING if job.state is JobState.RUNNING else JobState.PENDING
            why = "sweep restored: the trial runs again from its last checkpoint"
            try:  # handed back (no owner): the restored trial's runner claims it
                if job.state is not JobState.RETRYING:
                    store.transition(job.id, target, reason=why, expected=[job.state], as_owner=job.owner,
                                     release=True)
                else:
                    store.release(job.id, owner=job.owner, reason=why)
                return store.get(job.id)
            except (IllegalTransition, OwnershipLost):
                continue
        # FAILED / CANCELLED / STOPPED: a fresh job for the retried trial
    raise RuntimeError(f"trial {index}: could not find or create its job")


class RecordTrialEnds(Callback):
    """Tune callback in the sweep's driver: a trial that ends without finishing training was stopped
    by the scheduler (STOPPED); one that errored before its job settled is FAILED."""

    def __init__(self, scheduler: str):
        self.scheduler = scheduler
        self._store: JobStore | None = None  # opened where it runs; Tune pickles its callbacks

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "_store": None}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        job_id = last.get("job_id")
        if job_id and not last.get("finished"):
            evaluations = last.get("training_iteration", 0)
            self._settle(
                job_id, JobState.STOPPED, f"stopped early by {self.scheduler.upper()} after {evaluations} evaluation(s)"
            )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        job_id = (trial.last_result or {}).get("job_id")
        if job_id:
            self._settle(job_id, JobState.FAILED, "the trial errored")

    def _settle(self, job_id: str, to: JobState, reason: str) -> None:
        job = self.store.get(job_id)
        _release(job, reason)
        if job.state in TERMINAL:
            return
        try:
            if to is JobState.STOPPED and job.state is not JobState.RUNNING:
                to = JobState.CANCELLED  # stopped before it trained: nothing to keep
            self.store.transition(job_id, to, reason=reason)
        except IllegalTransition:
            return  # the trial's own runner settled it first
        # its workers were killed before they could end its tracked run
        try:
            tracking = getattr(parse_job_spec(job.spec), "tracking", None)
        except ValueError:  # a spec this driver validated once; nothing to end if it no longer reads
            return
        end_job_run(tracking, job_id, "FAILED" if to is JobState.FAILED else "KILLED")


def _release(job, reason: str) -> None:
    """Free what an ended trial's job held: its base-group rows (gone at the group's next step) or its
    Ray Train workers."""
    leave(job, reason)
    _release_workers(job.runtime.get("placement_group"))


def _release_workers(placement_group: str | None) -> None:
    """Remove the placement group of a trial's Ray Train workers. Tune kills a stopped trial's actor
    at once; the Train controller it owned dies with it, but its workers' placement group can stay
    reserved (seen with Ray 2.60), starving every later trial. Removing it kills what is left."""
    if not placement_group:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(placement_group)))
    except Exception:  # noqa: BLE001 - already gone
        pass


def _scheduler(spec: SweepSpec):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    opts = spec.scheduler_options
    if spec.scheduler == "pbt":
        space = {
            path: (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high)
            for path, (kind, low, high) in mutable(spec).items()
        }
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=int(opts.get("perturbation_interval", 2)),
            hyperparam_mutations={"trial": {"params": space}},
            quantile_fraction=0.25,
        )
    if spec.scheduler == "asha":
        # Rungs at grace_period × reduction_factor^k evaluations; trials that finish sooner just finish.
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=10_000,
            grace_period=int(opts.get("grace_period", 1)),
            reduction_factor=opts.get("reduction_factor", 2),
        )
    return FIFOScheduler()


def run_sweep(sweep_id: str, *, resume: bool = False) -> SweepRecord:
    from ray import tune

    store = JobStore()
    record = store.sweeps.get(sweep_id)
    spec = record.sweep_spec
    submission_id = os.environ.get("PEFTFLEET_SUBMISSION_ID")
    storage = store.artifacts.uri_for("sweeps")
    name = f"sweep-{sweep_id}"
    plan = packing(spec)
    trainable = tune.with_resources(
        tune.with_parameters(trial, sweep_id=sweep_id, submission_id=submission_id), {"CPU": plan.trial_cpu}
    )
    callbacks = [RecordTrialEnds(spec.scheduler)]
    # Only the driver the sweep names takes it over (two resumes: the one recorded last; a settled sweep: none).
    store.sweeps.update(sweep_id, state="RUNNING", experiment_path=os.path.join(storage, name), error=None,
                        runtime={**record.runtime, "packing": plan.describe()}, expected=("PENDING",),
                        driver=submission_id)
    tracking = None
    try:
        tracking = _track_sweep(store, sweep_id, spec, submission_id)
        if resume and tune.Tuner.can_restore(os.path.join(storage, name)):
            # Tune unpickles the experiment's state (tuner.pkl and the trials'): restore trusts the experiment
            # folder, which must be writable only by the cluster (docs/sweeps.md#resume)
            tuner = tune.Tuner.restore(
                os.path.join(storage, name),
                trainable,
                resume_unfinished=True,
                resume_errored=True,
                param_space=_param_space(spec),
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    scheduler=_scheduler(spec),
                    num_samples=1,
                    max_concurrent_trials=plan.max_concurrent,
                ),
                # A trial's last report (its job finished) ends it, before the scheduler sees it: PBT
                # must not "continue" a trial that has nothing left to train.
                run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1,
                                          stop=_finished),
            )
        tuner.fit()
        done = _finish(store, sweep_id, spec, submission_id)
        if done.best_value is not None:
            tracking.log_metrics(0, {f"best_{spec.metric}": done.best_value})
            tracking.set_tags({"peftfleet.best_job_id": done.best_job_id, "peftfleet.best_adapter": done.best_adapter})
        # every trial is over: a run its killed workers left RUNNING was stopped
        tracking.close("FINISHED" if done.state == "SUCCEEDED" else "FAILED", children="KILLED")
        return done
    except BaseException as e:
        # Tune turns SIGTERM during fit into SystemExit: the driver was stopped, the sweep can resume.
        state = "INTERRUPTED" if isinstance(e, (KeyboardInterrupt, Interrupted, SystemExit)) else "FAILED"
        if tracking is not None:  # a resumed sweep continues the run
            tracking.close("KILLED" if state == "INTERRUPTED" else "FAILED")
        try:
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"[:20000]
            store.sweeps.update(sweep_id, state=state, error=error, expected=("RUNNING",), driver=submission_id)
        except SweepChanged:
            pass  # another driver or a cancel settled it first
        raise


def _track_sweep(store: JobStore, sweep_id: str, spec: SweepSpec, driver: str | None) -> RunTracking:
    """The sweep's own run (MLflow: the parent of its trials' runs; a resumed sweep continues it), its id
    recorded on the sweep for the trials. A tracker that does not answer leaves the trials without a parent."""
    tracking = RunTracking(sweep_tracking(spec), key=(SWEEP_TAG, sweep_id), run_name=spec.name)
    params = {"sweep_id": sweep_id, "metric": spec.metric, "mode": spec.mode, "scheduler": spec.scheduler,
              "num_samples": str(spec.num_samples), "seed": str(spec.seed)}
    params.update({f"search_space.{k}": json.dumps(v) for k, v in spec.search_space.items()})
    run_id = tracking.open(params)
    if run_id is not None:
        record = store.sweeps.get(sweep_id)
        store.sweeps.update(sweep_id, runtime={**record.runtime, "mlflow_run_id": run_id}, driver=driver)
    return tracking


def _finished(trial_id: str, result: dict[str, Any]) -> bool:
    return bool(result.get("finished"))


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    return {"trial": tune.grid_search([{"index": i, "params": p} for i, p in enumerate(draw(spec))])}


def _finish(store: JobStore, sweep_id: str, spec: SweepSpec, driver: str | None) -> SweepRecord:
    """The best finished trial by its last reported metric; its adapter is the sweep's result."""
    best = None
    for t in store.sweeps.trials(sweep_id):
        if t.job.state is not JobState.SUCCEEDED:
            continue
        values = store.metrics(t.job.id, spec.metric)
        adapters = store.adapters.list(job_id=t.job.id)
        if not values or not adapters:
            continue
        value = values[-1].value
        if best is None or (value > best[0] if spec.mode == "max" else value < best[0]):
            best = (value, t.job.id, adapters[0].name)
    if best is None:
        return store.sweeps.update(sweep_id, state="FAILED", error="no trial finished with an adapter",
                                   expected=("RUNNING",), driver=driver)
    if spec.promote:
        store.adapters.promote(best[2])
    return store.sweeps.update(
        sweep_id, state="SUCCEEDED", best_value=best[0], best_job_id=best[1], best_adapter=best[2],
        expected=("RUNNING",), driver=driver,
    )


class Interrupted(BaseException):
    """SIGTERM (`ray job stop`, a node going away): the sweep stops, resumable."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main() -> None:
    sweep_id = sys.argv[1]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        record = run_sweep(sweep_id, resume="--resume" in sys.argv[2:])
    except BaseException:
        sys.exit(1)
    sys.exit(0 if record.state == "SUCCEEDED" else 1)


if __name__ == "__main__":
    main()
