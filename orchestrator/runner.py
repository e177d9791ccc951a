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

from jobs.secrets import has_password
from jobs.states import JobState
from jobs.store import JobStore, OwnershipLost, redact_url
from orchestrator.reconciler import HEARTBEAT_INTERVAL_S


class _Stopped(BaseException):
    """SIGTERM from `ray job stop`: unwind and settle the job as cancelled."""


def _heartbeat(store: JobStore, job_id: str, owner: str, stop: threading.Event, lost: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_INTERVAL_S):
        try:
            alive = store.heartbeat(job_id, owner)
        except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the job
            print(f"heartbeat failed: {redact_url(str(e))}", file=sys.stderr, flush=True)
            continue
        if not alive:  # settled, or another runner owns it now: stop the work, write nothing more
            lost.set()
            if threading.current_thread() is not threading.main_thread() and _MAIN_RUNS.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            return


def _on_sigterm(signum, frame) -> None:
    raise _Stopped()


def _on_lost(signum, frame) -> None:
    raise OwnershipLost("the runner lost its job (settled or claimed by another runner)")


_MAIN_RUNS = threading.Event()  # the job runs in the main thread, where SIGUSR1 interrupts it


def run(job_id: str, owner: str, *, store: JobStore | None = None, init_checkpoint: str | None = None) -> JobState:
    """Run one job to a terminal state and return it; re-raises what made it fail. Any thread may call
    this (a sweep's trial does); only ``main`` turns SIGTERM into a cancel. ``init_checkpoint``: a Ray Train
    checkpoint folder of another job to start from (PBT).

    The runner first claims the job (compare-and-swap on state, owner and attempt): a job another runner
    owns is left alone (:class:`OwnershipLost`), a settled one is returned as it is. Every write after
    that names the owner; once the store says the job is no longer this runner's (settled by someone
    else, or handed to a new runner), the work stops and nothing more is written."""
    store = store or JobStore()
    job = store.get(job_id)
    spec = job.job_spec
    solo = _why_solo(spec, job, init_checkpoint)
    waits = f"waiting for {spec.resources.num_workers} worker(s)" if solo else "waiting for its base group"
    job = store.claim(job_id, owner, reason=waits + (f"; runs solo: {solo}" if solo and spec.kind == "train" else ""))
    if job.state.is_terminal:
        print(f"job {job_id} is already {job.state}; nothing to run", flush=True)
        return job.state
    stop, lost = threading.Event(), threading.Event()
    threading.Thread(target=_heartbeat, args=(store, job_id, owner, stop, lost), daemon=True).start()
    try:
        base = store.register_base_model(spec.base_model)
        shared = {
            "job_id": job_id,
            "owner": owner,
            "store_url": None if has_password(store.url) else store.url,  # a secret: workers read their env
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
            outcome = _train(job_id, job.attempt, job.spec, spec, shared, store)
        _settle(store, job_id, owner, JobState.SUCCEEDED, outcome)  # registration already did, as a rule
        return store.get(job_id).state
    except (_Stopped, KeyboardInterrupt):
        _settle(store, job_id, owner, JobState.CANCELLED, "stopped on request")
        return JobState.CANCELLED
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, then re-raised
        if lost.is_set() or isinstance(e, OwnershipLost) or store.get(job_id).owner != owner:
            print(f"job {job_id}: this runner no longer owns it; its work stopped ({type(e).__name__})", flush=True)
            return store.get(job_id).state
        current = store.get(job_id)
        if current.runtime.get("sweep_id") and _owner_stopped(e):
            # A sweep trial's scheduler paused or stopped it: Tune ended the trial's actor, and the Ray
            # Train controller it owned died with it. A scheduling decision, not a failure.
            _settle(store, job_id, owner, JobState.STOPPED if current.state is JobState.RUNNING else JobState.CANCELLED,
                    "ended by the sweep's scheduler (trial paused or stopped)")
            raise
        cancelling = current.state is JobState.CANCELLING
        _settle(
            store,
            job_id,
            owner,
            JobState.CANCELLED if cancelling else JobState.FAILED,
            "stopped on request" if cancelling else "training failed",
            error=redact_url(f"{type(e).__name__}: {e}")[:20000],
            traceback=redact_url(traceback.format_exc()),
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


def _train(job_id: str, attempt: int, raw_spec: dict, spec, shared: dict, store: JobStore) -> str:
    """Ray Train's TorchTrainer over the recipe; returns what the job produced, in words."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train_worker import checkpoint_root, run_name, train_loop_per_worker

    res, gpus = spec.resources, spec.resources.gpus_per_worker
    datasets, streamed = _streamed_data(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**shared, "spec": raw_spec, **streamed},
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=gpus > 0, placement_strategy=res.placement_strategy,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            name=run_name(job_id, attempt),  # each attempt its own run: two runners never share a folder
            storage_path=checkpoint_root(store),
            failure_config=FailureConfig(max_failures=int(os.environ.get("PEFTFLEET_MAX_FAILURES", "0"))),
        ),
    )
    trainer.fit()
    adapters = store.adapters.list(job_id=job_id)
    return f"adapter {adapters[0].name} registered" if adapters else "finished"


def _streamed_data(spec) -> tuple[dict | None, dict]:
    """Ray Data's ``datasets`` for the trainer and what its workers' config gains, when the job's data
    streams (``dataset.streaming``; see orchestrator.data_shards); else (None, {}): every worker loads it."""
    from jobs.training.sources import wants_streaming

    if spec.kind != "train" or not wants_streaming(spec.dataset):
        return None, {}
    from orchestrator.data_shards import plan

    train, info = plan(spec)
    print(f"streaming {info['rows']} training rows through Ray Data shards; {len(info['eval'])} held out",
          flush=True)
    return {"train": train}, {"stream": info}


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


def _settle(store: JobStore, job_id: str, owner: str, to: JobState, reason: str, **fields) -> None:
    if not store.get(job_id).state.is_terminal:  # the client may have settled a cancel already
        try:
            store.transition(job_id, to, reason=reason, as_owner=owner, **fields)
        except OwnershipLost as e:
            print(f"not settling job {job_id} as {to}: {e}", flush=True)


def main() -> None:
    job_id, owner = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else f"runner-pid-{os.getpid()}"
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _on_lost)
    _MAIN_RUNS.set()
    try:
        state = run(job_id, owner)
    except BaseException:
        sys.exit(1)
    sys.exit(0 if state is JobState.SUCCEEDED else 1)


if __name__ == "__main__":
    main()
