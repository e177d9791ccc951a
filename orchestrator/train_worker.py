"""The Ray Train glue around the recipe: what every Ray Train worker of a job runs.

``train_loop_per_worker`` reads Ray Train's context (rank, world size, the checkpoint to resume
from), resolves registry references in the method config, and runs
:class:`jobs.training.recipe.Recipe` with a :class:`RayTrainReporter`: rank 0 is the job's voice in
the store (state, metrics, placement, the adapter's registration); every rank reports to Ray Train.
Checkpoints live where Ray Train keeps them: ``<checkpoint root>/peftfleet-<job id>/checkpoint_*``,
each folder holding DeepSpeed's files under the tag ``peftfleet`` and the step it holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch.distributed as dist

from jobs.spec import parse_job_spec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.training.recipe import STEP_FILE, Recipe
from jobs.training.subspaces import resolve_method_config
from orchestrator.tune.pbt_hold import Hold


def checkpoint_root(store: JobStore) -> str:
    """Where Ray Train keeps jobs' checkpoints (``PEFTFLEET_CHECKPOINT_URL``, else ``<storage>/checkpoints``)."""
    return os.environ.get("PEFTFLEET_CHECKPOINT_URL") or os.path.join(store.artifacts.url, "checkpoints")


def run_name(job_id: str) -> str:
    """Ray Train's run (and folder) name for a job."""
    return f"peftfleet-{job_id}"


def checkpoint_at(store: JobStore, job_id: str, step: int) -> str | None:
    """The folder of the job's checkpoint holding ``step``, if Ray Train (or its base group) kept it."""
    run_dir = Path(checkpoint_root(store)) / run_name(job_id)
    packed = run_dir / "packed" / f"step-{step}"
    if packed.is_dir():
        return str(packed)
    for folder in sorted(run_dir.glob("checkpoint_*")):
        step_file = folder / STEP_FILE
        if step_file.is_file() and json.loads(step_file.read_text())["step"] == step:
            return str(folder)
    return None


class RayTrainReporter:
    """The recipe's reporter inside a Ray Train worker (see :class:`jobs.training.reporter.Reporter`)."""

    def __init__(self, config: dict[str, Any], spec: Any, rank: int, world: int):
        self.config, self.spec, self.rank, self.world = config, spec, rank, world
        self.job_id, self.owner = config["job_id"], config.get("owner")
        self.store = _store(config) if rank == 0 else None
        self._hold = Hold(self.store, self.job_id) if self.store is not None else None

    @contextmanager
    def checkpoint_to_resume(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def started(self, *, step: int, total_steps: int, resumed: bool, summary: dict[str, float]) -> None:
        nodes = _worker_nodes(self.world)  # collective: every rank takes part
        if self.store is None:
            return
        store, job_id = self.store, self.job_id
        if resumed:
            how = f"; resumed from the checkpoint at step {step}"
        else:
            how = f"; continuing another job's checkpoint at step {step}" if step else ""
        current = store.get(job_id).state
        if current is JobState.RUNNING and resumed:  # Ray Train restarted the worker group
            store.transition(job_id, JobState.RETRYING, reason=f"worker group restarted after a failure{how}",
                             as_owner=self.owner)
            current = JobState.RETRYING
        if current is not JobState.RUNNING:
            store.transition(job_id, JobState.RUNNING, reason=f"{self.world} worker(s) training{how}",
                             expected=[JobState.QUEUED, JobState.RETRYING], as_owner=self.owner)
        store.set_runtime(job_id, worker_nodes=nodes, placement_group=_placement_group())
        if step:
            store.record_metrics(job_id, step, {"resumed_from_step": step}, owner=self.owner)
        store.record_metrics(job_id, step, summary, owner=self.owner)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.store is not None:  # refused once this job is no longer its runner's: the workers stop
            self.store.record_metrics(self.job_id, step, values, owner=self.owner)

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        report = {"step": step, **metrics}
        if checkpoint is None:
            ray.train.report(report)
        else:  # persisted to Ray Train's storage before report returns
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(checkpoint))

    def hold(self, step: int) -> None:
        if self._hold is not None:  # rank 0 waits; the other ranks wait for it at the next collective
            self._hold.begin(step)
            self._hold.wait()

    held = False  # a solo job waits inside hold()

    def register_adapter(self, folder: str, metrics: dict[str, float]) -> str:
        fingerprint = self.config["base_fingerprint"]
        return register_job_adapter(self.store, self.spec, self.job_id, fingerprint, folder, metrics, owner=self.owner)

    def finished(self, step: int, metrics: dict[str, float], adapter: str | None) -> None:
        ray.train.report({"step": step, **metrics, "adapter": adapter or ""})


def register_job_adapter(store: JobStore, spec: Any, job_id: str, base_fingerprint: str, folder: str,
                         metrics: dict[str, float], *, owner: str | None) -> str:
    """Register the adapter a job trained (named after the job) and, in the same transaction, move the job
    to SUCCEEDED as ``owner`` — both land or neither, so only a SUCCEEDED job has an adapter and a job
    resubmitted after this point finds itself done. Returns the adapter's name."""
    name = f"{spec.name}-{job_id[:8]}"

    def succeed(session) -> None:
        store.transition_in(session, job_id, JobState.SUCCEEDED, reason=f"adapter {name} registered",
                            as_owner=owner)

    store.adapters.register(folder, name=name, base_fingerprint=base_fingerprint, task=spec.task,
                            task_name=spec.effective_task_name, job_id=job_id, metrics=metrics, tags=spec.tags,
                            in_transaction=succeed)
    return name


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: job_id, spec, store_url, storage_url, home,
    base_fingerprint, and init_checkpoint (a PBT continuation) when there is one."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = parse_job_spec(config["spec"])
    # DeepSpeed's accelerator follows this job's resources, not whatever launched it (a sweep's driver
    # serves trials with and without GPUs); set before DeepSpeed is first imported in this worker.
    os.environ["DS_ACCELERATOR"] = "cuda" if spec.resources.gpus_per_worker else "cpu"
    device = None
    if spec.resources.gpus_per_worker:  # the GPU Ray gave this rank (not necessarily cuda:LOCAL_RANK)
        from ray.train.torch import get_device

        device = get_device()
    reporter = RayTrainReporter(config, spec, rank, world)
    # Registry references in the method config (an IPT subspace) become verified local folders.
    method_config, lineage = resolve_method_config(
        spec.method, reporter.store or _store(config), config["base_fingerprint"]
    )
    metadata = {"base_fingerprint": config["base_fingerprint"], "job_id": config["job_id"], **lineage}
    Recipe(spec, reporter, rank=rank, world=world, method_config=method_config, metadata=metadata, home=config["home"],
           init_checkpoint=config.get("init_checkpoint"), device=device).run()


def _store(config: dict[str, Any]) -> JobStore:
    return JobStore(config["store_url"], storage_url=config["storage_url"], home=config["home"])


def _placement_group() -> str | None:
    """The id of the placement group holding this job's workers (so whoever stops the job abruptly,
    e.g. a sweep's scheduler, can give its resources back)."""
    pg = ray.util.get_current_placement_group()
    return None if pg is None else pg.id.hex()


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (where the workers were placed)."""
    mine = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or world == 1:
        return [mine]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


__all__ = ["RayTrainReporter", "checkpoint_at", "checkpoint_root", "register_job_adapter", "run_name",
           "train_loop_per_worker"]
