"""The one interface the training recipe talks to the outside world through.

Every rank calls every method at the same point of the loop; an implementation decides what only
rank 0 does (the job's voice: state, metrics, the adapter's registration) and what every rank must
do together (Ray Train's ``report`` is collective). Ray Train's is ``orchestrator.train_worker``;
:class:`InMemoryReporter` keeps everything in lists, for tests and for running a recipe by hand.

Checkpoints are recorded through it (:meth:`Reporter.checkpoint_saved`, the sha256 of every file) and
looked up through it before one is restored (:meth:`Reporter.checkpoint_record`): the recipe loads
only what :mod:`jobs.training.checkpoints` verified against that record.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol


class Reporter(Protocol):
    checkpoint_root: str | None
    """The folder every checkpoint this reporter hands over lies under (a restore elsewhere is refused);
    None: no such folder (an in-memory reporter's copies)."""

    def checkpoint_to_resume(self) -> AbstractContextManager[str | None]:
        """A folder holding this job's latest recorded checkpoint, of any attempt (after a restart), or
        None for a fresh start."""

    def checkpoint_saved(self, step: int, files: dict[str, str]) -> None:
        """The checkpoint at ``step`` that :meth:`progress` just persisted holds ``files`` (relative path ->
        sha256, every rank's): record them with the job's attempt (rank 0), before anyone is told of it."""

    def checkpoint_record(self, job_id: str, step: int) -> dict[str, str] | None:
        """The files recorded for ``job_id``'s checkpoint at ``step`` (every rank gets them), or None."""

    def started(self, *, step: int, total_steps: int, resumed: bool, summary: dict[str, float]) -> None:
        """Workers are training from ``step``: the job is RUNNING (RETRYING first if ``resumed`` after a
        failure); ``summary`` holds its size (parameters, world size, total steps)."""

    def dataset_used(self, fingerprint: dict[str, Any] | None) -> None:
        """What the job trains on (source, content hash or revision, format, rows, split; see docs/data.md),
        right after :meth:`started`: record it with the job (rank 0 has it; None elsewhere)."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Record metrics at ``step`` (rank 0's values count)."""

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        """An evaluation (or a checkpoint) reached: tell the scheduler; ``checkpoint`` is a folder that
        must be persisted before this returns."""

    def hold(self, step: int) -> None:
        """The checkpoint at ``step`` is recorded and a sweep's scheduler may act on it (PBT): block until it
        has, or mark the job :attr:`held` (a base group, which trains its other members meanwhile)."""

    @property
    def held(self) -> bool:
        """True while the job must not train on (see :meth:`hold`)."""

    def register_adapter(self, folder: str, metrics: dict[str, float]) -> str:
        """Publish and record the trained adapter (rank 0 only); returns its name."""

    def finished(self, step: int, metrics: dict[str, float], adapter: str | None) -> None:
        """Training is over and the adapter (rank 0's name, None elsewhere) registered."""


class InMemoryReporter:
    """A reporter that keeps what it is told (checkpoints and adapters copied to folders of their own, the
    checkpoints' records in a dict); ``resume_from`` makes it offer that checkpoint folder as the job's own,
    ``records`` holds records made elsewhere (``(job_id, step) -> files``)."""

    checkpoint_root: str | None = None

    def __init__(self, resume_from: str | None = None, *, job_id: str = "job",
                 records: dict[tuple[str, int], dict[str, str]] | None = None):
        self.resume_from, self.job_id = resume_from, job_id
        self.records = dict(records or {})
        self.events: list[tuple[str, Any]] = []
        self.recorded: list[tuple[int, str, float]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.adapters: list[tuple[str, dict[str, float]]] = []
        self.dataset: dict[str, Any] | None = None  # the fingerprint of what it trained on

    @contextmanager
    def checkpoint_to_resume(self) -> Iterator[str | None]:
        yield self.resume_from

    def checkpoint_saved(self, step: int, files: dict[str, str]) -> None:
        self.records[(self.job_id, step)] = dict(files)

    def checkpoint_record(self, job_id: str, step: int) -> dict[str, str] | None:
        return self.records.get((job_id, step))

    def started(self, *, step: int, total_steps: int, resumed: bool, summary: dict[str, float]) -> None:
        self.events.append(("started", {"step": step, "total_steps": total_steps, "resumed": resumed, **summary}))

    def dataset_used(self, fingerprint: dict[str, Any] | None) -> None:
        self.dataset = fingerprint

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.recorded.extend((step, k, float(v)) for k, v in values.items())

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        self.events.append(("progress", {"step": step, **metrics}))
        if checkpoint is not None:  # the recipe deletes its folder afterwards: keep a copy
            kept = shutil.copytree(checkpoint, tempfile.mkdtemp(prefix="peftfleet-ckpt-"), dirs_exist_ok=True)
            self.checkpoints.append((step, kept))

    def hold(self, step: int) -> None:
        pass  # no scheduler decides on it

    held = False

    def register_adapter(self, folder: str, metrics: dict[str, float]) -> str:
        kept = shutil.copytree(folder, tempfile.mkdtemp(prefix="peftfleet-adapter-"), dirs_exist_ok=True)
        self.adapters.append((kept, dict(metrics)))
        return f"adapter-{len(self.adapters)}"

    def finished(self, step: int, metrics: dict[str, float], adapter: str | None) -> None:
        self.events.append(("finished", {"step": step, "adapter": adapter, **metrics}))

    def values(self, name: str) -> list[tuple[int, float]]:
        """Every recorded ``(step, value)`` of the metric ``name``."""
        return [(step, value) for step, key, value in self.recorded if key == name]
