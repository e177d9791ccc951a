"""The Ray Train glue around the recipe: what every Ray Train worker of a job runs.

``train_loop_per_worker`` reads Ray Train's context (rank, world size, the checkpoint to resume
from), resolves registry references in the method config, and runs
:class:`jobs.training.recipe.Recipe` with a :class:`RayTrainReporter`: rank 0 is the job's voice in
the store (state, metrics, placement, the adapter's registration); every rank reports to Ray Train.
Checkpoints live where Ray Train keeps them, one folder per attempt and step:
``<checkpoint root>/<run name>/a<attempt>-step-<N>``, each holding DeepSpeed's files under the tag
``peftfleet`` and the job and step it holds. Each is recorded in the store (the sha256 of its files)
once persisted; a worker resumes from the job's latest record, of any attempt, not from whatever Ray
Train hands it, and only after the folder verified (``jobs.training.checkpoints``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.train
import torch.distributed as dist

from jobs.spec import parse_job_spec
from jobs.states import JobState
from jobs.store import JobStore, OwnershipLost
from jobs.tracking import TrackedReporter
from jobs.training.recipe import Recipe
from jobs.training.subspaces import resolve_method_config
from orchestrator.tune.pbt_hold import Hold


def checkpoint_root(store: JobStore) -> str:
    """Where Ray Train keeps jobs' checkpoints (``PEFTFLEET_CHECKPOINT_URL``, else ``<storage>/checkpoints``)."""
    return os.environ.get("PEFTFLEET_CHECKPOINT_URL") or os.path.join(store.artifacts.url, "checkpoints")


def run_name(job_id: str, attempt: int | None = None) -> str:
    """Ray Train's run (and folder) name for a job; with ``attempt``, that attempt's own run
    (``peftfleet-<job>-a<attempt>``), so runners of two attempts never share a run folder."""
    return f"peftfleet-{job_id}" if attempt is None else f"peftfleet-{job_id}-a{attempt}"


def checkpoint_at(store: JobStore, job_id: str, step: int) -> str | None:
    """The folder of the job's checkpoint holding ``step`` (solo or from its base group), as the store
    recorded it (latest attempt first); None if none was recorded."""
    found = store.checkpoints.find(job_id, step=step)
    return None if found is None else found.folder


class RayTrainReporter:
    """The recipe's reporter inside a Ray Train worker (see :class:`jobs.training.reporter.Reporter`)."""

    def __init__(self, config: dict[str, Any], spec: Any, rank: int, world: int):
        self.config, self.spec, self.rank, self.world = config, spec, rank, world
        self.job_id, self.owner = config["job_id"], config.get("owner")
        self.store = _store(config) if rank == 0 else None
        self._hold = Hold(self.store, self.job_id) if self.store is not None else None
        self._root = _from_rank0(checkpoint_root(self.store) if self.store is not None else None, world)
        # a restore reads only folders under the (local or shared) checkpoint root; remote storage is
        # downloaded to a private folder first, where the hashes alone vouch for it
        self.checkpoint_root = None if "://" in self._root else self._root
        # this worker group's attempt (its checkpoint folders are its own); a restart moves it on in started()
        self.attempt = self.store.get(self.job_id).attempt if self.store is not None else None
        self._persisted: tuple[int, str] | None = None  # (step, folder) of the last checkpoint persisted

    @contextmanager
    def checkpoint_to_resume(self) -> Iterator[str | None]:
        """The job's latest recorded checkpoint of any attempt (what Ray Train would hand over is ignored:
        only the store vouches for a folder)."""
        latest = self.store.checkpoints.latest(self.job_id) if self.store is not None else None
        folder = _from_rank0(None if latest is None else latest.folder, self.world)
        if folder is None:
            yield None
        elif "://" in folder:
            with ray.train.Checkpoint(folder).as_directory() as local:
                yield local
        else:
            yield folder

    def checkpoint_saved(self, step: int, files: dict[str, str]) -> None:
        if self.store is not None and self._persisted is not None and self._persisted[0] == step:
            self.store.checkpoints.record(self.job_id, self.attempt, step, self._persisted[1], files, owner=self.owner)

    def checkpoint_record(self, job_id: str, step: int) -> dict[str, str] | None:
        found = self.store.checkpoints.find(job_id, step=step) if self.store is not None else None
        return _from_rank0(None if found is None else found.files, self.world)

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
        self.attempt = store.get(job_id).attempt  # a restart (RETRYING) began a new attempt
        store.set_runtime(job_id, worker_nodes=nodes, placement_group=_placement_group())
        if step:
            store.record_metrics(job_id, step, {"resumed_from_step": step}, owner=self.owner)
        store.record_metrics(job_id, step, summary, owner=self.owner)

    def dataset_used(self, fingerprint: dict[str, Any] | None) -> None:
        if self.store is not None and fingerprint is not None:
            self.store.set_runtime(self.job_id, dataset=fingerprint)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.store is not None:  # refused once this job is no longer its runner's: the workers stop
            self.store.record_metrics(self.job_id, step, values, owner=self.owner)

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        report = {"step": step, **metrics}
        if checkpoint is None:
            ray.train.report(report)
            return
        name = None  # Ray Train takes rank 0's folder name
        if self.store is not None:
            name = f"a{self.attempt}-step-{step}"
            run = ray.train.get_context().get_experiment_name()
            self._persisted = (step, f"{self._root.rstrip('/')}/{run}/{name}")
        # persisted to Ray Train's storage (every rank's files in one folder) before report returns
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(checkpoint), checkpoint_dir_name=name)

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
    base_fingerprint, and init_checkpoint (a PBT continuation) when there is one, stream (what
    ``orchestrator.data_shards.plan`` returned) when the job's data streams."""
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
    stream = None
    if config.get("stream"):  # the job's training rows stream: this worker reads its own shard
        from orchestrator.data_shards import ShardStream

        stream = ShardStream(ray.train.get_dataset_shard("train"), config["stream"], seed=spec.training.seed,
                             rank=rank)
    # Registry references in the method config (an IPT subspace) become verified local folders.
    method_config, lineage = resolve_method_config(
        spec.method, reporter.store or _store(config), config["base_fingerprint"]
    )
    metadata = {"base_fingerprint": config["base_fingerprint"], "job_id": config["job_id"], **lineage}
    # rank 0 (the job's voice in the store) also logs to the spec's trackers; a failure ends its run FAILED
    with TrackedReporter(reporter, spec, config["job_id"], voice=rank == 0, store=reporter.store,
                         stopped=(OwnershipLost,)) as tracked:
        Recipe(spec, tracked, rank=rank, world=world, method_config=method_config, metadata=metadata,
               home=config["home"], init_checkpoint=config.get("init_checkpoint"), device=device,
               train_stream=stream).run()


def _from_rank0(value: Any, world: int) -> Any:
    """``value`` as rank 0 has it, on every rank (collective: every rank calls it at the same point)."""
    if world == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
