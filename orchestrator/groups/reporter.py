"""A member's voice in the store while it trains in a base group (the group's counterpart of
``orchestrator.train_worker.RayTrainReporter``): its state, metrics, checkpoints and adapter.

Checkpoints are persisted under ``<checkpoint root>/peftfleet-<job id>/packed/a<attempt>/step-<N>`` (one
folder per attempt, so runners of two attempts never write into one; written to a temporary folder,
then renamed, so a reader never sees half of one) and recorded in the store with the sha256 of their
files; the job resumes from its latest record, of any attempt, after its group dies, in whichever
group it joins next, once the folder verified. The newest two are kept (every one for a PBT trial:
other trials continue from them).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.states import JobState
from jobs.store import JobStore
from orchestrator.train_worker import checkpoint_root, register_job_adapter, run_name
from orchestrator.tune.pbt_hold import Hold

KEEP_CHECKPOINTS = 2


def packed_checkpoints(store: JobStore, job_id: str) -> list[tuple[int, Path]]:
    """The job's persisted group checkpoints of every attempt, oldest first (by step, then attempt)."""
    folder = Path(checkpoint_root(store)) / run_name(job_id) / "packed"
    found = []
    for p in folder.glob("a*/step-*"):
        a, m = re.fullmatch(r"a(\d+)", p.parent.name), re.fullmatch(r"step-(\d+)", p.name)
        if a and m:
            found.append(((int(m.group(1)), int(a.group(1))), p))
    return [(step, p) for (step, _), p in sorted(found)]


class GroupReporter:
    """The :class:`jobs.training.reporter.Reporter` of a job training in base group ``group``."""

    def __init__(self, store: JobStore, job_id: str, spec: Any, base_fingerprint: str, group: str,
                 owner: str | None = None):
        self.store, self.job_id, self.spec, self.owner = store, job_id, spec, owner  # owner: the job's runner
        self.base_fingerprint, self.group = base_fingerprint, group
        self.members = 1  # members when this one started, for its events
        # A PBT trial's checkpoints are what other trials continue from: keep them all, as Ray Train does.
        self._hold = Hold(store, job_id)
        self.keep = None if self._hold.active else KEEP_CHECKPOINTS
        self.checkpoint_root = checkpoint_root(store)
        self.attempt = store.get(job_id).attempt  # its checkpoint folders are this attempt's own
        self._persisted: tuple[int, str] | None = None  # (step, folder) of the last checkpoint persisted

    @contextmanager
    def checkpoint_to_resume(self) -> Iterator[str | None]:
        latest = self.store.checkpoints.latest(self.job_id)
        yield None if latest is None else latest.folder

    def checkpoint_saved(self, step: int, files: dict[str, str]) -> None:
        if self._persisted is not None and self._persisted[0] == step:
            self.store.checkpoints.record(self.job_id, self.attempt, step, self._persisted[1], files, owner=self.owner)

    def checkpoint_record(self, job_id: str, step: int) -> dict[str, str] | None:
        found = self.store.checkpoints.find(job_id, step=step)
        return None if found is None else found.files

    def started(self, *, step: int, total_steps: int, resumed: bool, summary: dict[str, float]) -> None:
        store, job_id = self.store, self.job_id
        others = f" with {self.members - 1} other job(s)" if self.members > 1 else ""
        how = f"; resumed from its checkpoint at step {step}" if resumed else ""
        store.transition(job_id, JobState.RUNNING, reason=f"training in base group {self.group}{others}{how}",
                         expected=[JobState.QUEUED, JobState.RETRYING], as_owner=self.owner)
        store.set_runtime(job_id, base_group=self.group)
        if step:
            store.record_metrics(job_id, step, {"resumed_from_step": step}, owner=self.owner)
        store.record_metrics(job_id, step, summary, owner=self.owner)

    def dataset_used(self, fingerprint: dict[str, Any] | None) -> None:
        if fingerprint is not None:
            self.store.set_runtime(self.job_id, dataset=fingerprint)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.store.record_metrics(self.job_id, step, values, owner=self.owner)

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        if checkpoint is None:
            return
        root = Path(checkpoint_root(self.store)) / run_name(self.job_id) / "packed" / f"a{self.attempt}"
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".incoming-{uuid.uuid4().hex}"
        shutil.copytree(checkpoint, staging)
        final = root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self._persisted = (step, str(final))
        for _, old in packed_checkpoints(self.store, self.job_id)[: -self.keep if self.keep else 0]:
            shutil.rmtree(old, ignore_errors=True)

    def hold(self, step: int) -> None:
        self._hold.begin(step)  # the group trains its other members meanwhile

    @property
    def held(self) -> bool:
        return self._hold.waiting()

    def register_adapter(self, folder: str, metrics: dict[str, float]) -> str:
        return register_job_adapter(self.store, self.spec, self.job_id, self.base_fingerprint, folder, metrics,
                                    owner=self.owner)

    def finished(self, step: int, metrics: dict[str, float], adapter: str | None) -> None:
        pass  # its group settles it SUCCEEDED once it left (the runner may be gone)
