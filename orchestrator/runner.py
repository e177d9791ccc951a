"""The process that owns one job on the cluster (a Ray job entrypoint): `python -m orchestrator.runner JOB_ID`.

It moves the job to QUEUED, then either hands it to its base group (``orchestrator.groups``: one
resident frozen base many jobs train on; the group moves it to RUNNING, registers its adapter and
settles it) or,
when it cannot pack (the QUEUED event says why), runs Ray Train's `TorchTrainer` over
`orchestrator.train_worker.train_loop_per_worker` (whose rank 0 moves it to RUNNING once workers
have their resources, then runs the recipe), heartbeats to the store while it
lives, and settles the job: SUCCEEDED, FAILED with the error and traceback, or CANCELLED when it
was asked to stop. Configuration comes from the environment the client set (store, storage, home).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from jobs.states import JobState
from jobs.store import JobStore
from orchestrator.reconciler import HEARTBEAT_INTERVAL_S


class _Stopped(BaseException):
    """SIGTERM from `ray job stop`: unwind and settle the job as cancelled."""


def _heartbeat(store: JobStore, job_id: str, owner: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_INTERVAL_S):
        try:
            if not store.heartbeat(job_id, owner):
                return
        except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the job
            print(f"heartbeat failed: {e}", file=sys.stderr, flush=True)


def _on_sigterm(signum, frame) -> None:
    raise _Stopped()


def run(job_id: str, owner: str, *, store: JobStore | None = None, init_checkpoint: str | None = None) -> JobState:
    """Run one job to a terminal state and return it; re-raises what made it fail. Any thread may call
    this (a sweep's trial does); only ``main`` turns SIGTERM into a cancel. ``init_checkpoint``: a Ray Train
    checkpoint folder of another job to start from (PBT)."""
    store = store or JobStore()
    job = store.get(job_id)
    spec = job.job_spec
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, job_id, owner, stop), daemon=True).start()
    try:
        solo = _why_solo(spec, store.get(job_id), init_checkpoint)
        if store.get(job_id).state in (JobState.PENDING, JobState.RETRYING):
            waits = f"waiting for {spec.resources.num_workers} worker(s)" if solo else "waiting for its base group"
            store.transition(job_id, JobState.QUEUED, owner=owner,
                             reason=waits + (f"; runs solo: {solo}" if solo and spec.kind == "train" else ""))
        base = store.register_base_model(spec.base_model)
        shared = {
            "job_id": job_id,
            "store_url": store.url,
            "storage_url": store.artifacts.url,
            "home": str(store.home) if store.home else os.environ.get("PEFTFLEET_HOME"),
            "base_fingerprint": base.fingerprint,
        }
        if init_checkpoint:
            shared["init_checkpoint"] = init_checkpoint
        if spec.kind == "ipt-subspace":
            outcome = _fit_subspace(spec, shared)
        elif solo is None:
            from orchestrator.groups import train_in_group

            outcome = train_in_group(job_id, job.spec, spec, shared, store)
        else:
            outcome = _train(job_id, job.spec, spec, shared, store)
        _settle(store, job_id, JobState.SUCCEEDED, outcome)  # a base group settles its members itself
        return store.get(job_id).state
    except (_Stopped, KeyboardInterrupt):
        _settle(store, job_id, JobState.CANCELLED, "stopped on request")
        return JobState.CANCELLED
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, then re-raised
        current = store.get(job_id)
        if current.runtime.get("sweep_id") and _owner_stopped(e):
            # A sweep trial's scheduler paused or stopped it: Tune ended the trial's actor, and the Ray
            # Train controller it owned died with it. A scheduling decision, not a failure.
            _settle(store, job_id, JobState.STOPPED if current.state is JobState.RUNNING else JobState.CANCELLED,
                    "ended by the sweep's scheduler (trial paused or stopped)")
            raise
        cancelling = current.state is JobState.CANCELLING
        _settle(
            store,
            job_id,
            JobState.CANCELLED if cancelling else JobState.FAILED,
            "stopped on request" if cancelling else "training failed",
            error=f"{type(e).__name__}: {e}"[:20000],
            traceback=traceback.format_exc(),
        )
        raise
    finally:
        stop.set()


def _why_solo(spec, job, init_checkpoint: str | None) -> str | None:
    """Why the job trains with workers of its own rather than in a base group (None: it packs)."""
    if spec.kind != "train":
        return "not a training job"
    from jobs.training.base_group import packing_problem

    return packing_problem(spec, init_checkpoint=init_checkpoint)


def _train(job_id: str, raw_spec: dict, spec, shared: dict, store: JobStore) -> str:
    """Ray Train's TorchTrainer over the recipe; returns what the job produced, in words."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train_worker import checkpoint_root, run_name, train_loop_per_worker

    res, gpus = spec.resources, spec.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**shared, "spec": raw_spec},
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=gpus > 0, placement_strategy=res.placement_strategy,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            name=run_name(job_id),
            storage_path=checkpoint_root(store),
            failure_config=FailureConfig(max_failures=int(os.environ.get("PEFTFLEET_MAX_FAILURES", "0"))),
        ),
    )
    trainer.fit()
    adapters = store.adapters.list(job_id=job_id)
    return f"adapter {adapters[0].name} registered" if adapters else "finished"


def _fit_subspace(spec, shared: dict) -> str:
    """An ipt-subspace job: one Ray task with the job's resources."""
    import ray

    from jobs.training.subspaces import fit_subspace_job

    res = spec.resources
    task = ray.remote(fit_subspace_job).options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_retries=0
    )
    return f"subspace {ray.get(task.remote(shared))} registered"


def _owner_stopped(e: BaseException) -> bool:
    """The Train controller died because the process owning it is being stopped (not a crash of its own)."""
    from ray.exceptions import ActorDiedError

    return isinstance(e, ActorDiedError) and "TrainController" in str(e) and "INTENDED" in str(e)


def _settle(store: JobStore, job_id: str, to: JobState, reason: str, **fields) -> None:
    if not store.get(job_id).state.is_terminal:  # the client may have settled a cancel already
        store.transition(job_id, to, reason=reason, **fields)


def main() -> None:
    job_id, owner = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else f"runner-pid-{os.getpid()}"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        state = run(job_id, owner)
    except BaseException:
        sys.exit(1)
    sys.exit(0 if state is JobState.SUCCEEDED else 1)


if __name__ == "__main__":
    main()
