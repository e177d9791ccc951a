"""A member's voice in the store while it trains in a base group (the group's counterpart of
``orchestrator.train_worker.RayTrainReporter``): its state, metrics, checkpoints and adapter.

Checkpoints are persisted under ``<checkpoint root>/peftfleet-<job id>/packed/step-<N>`` (written to a
temporary folder, then renamed, so a reader never sees half of one); the job resumes from its newest
after its group dies, in whichever group it joins next. The newest two are kept (every one for a PBT
trial: other trials continue from them).
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
    """The job's persisted group checkpoints, oldest first."""
    folder = Path(checkpoint_root(store)) / run_name(job_id) / "packed"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return sorted(found)


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

    @contextmanager
    def checkpoint_to_resume(self) -> Iterator[str | None]:
        found = packed_checkpoints(self.store, self.job_id)
        yield str(found[-1][1]) if found else None

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

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.store.record_metrics(self.job_id, step, values, owner=self.owner)

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        if checkpoint is None:
            return
        root = Path(checkpoint_root(self.store)) / run_name(self.job_id) / "packed"
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".incoming-{uuid.uuid4().hex}"
        shutil.copytree(checkpoint, staging)
        final = root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
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
