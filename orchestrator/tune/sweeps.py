"""Sweeps from the client: start one (a Ray job running :mod:`orchestrator.tune.driver`), follow it,
list its trials, resume it after its driver died, plot it.

>>> space = {"training.lr": {"loguniform": [1e-4, 1e-2]}, "method.r": {"choice": [4, 8, 16]}}
>>> sweep = client.tune("examples/trec-lora.yaml", scheduler="asha", search_space=space)  # doctest: +SKIP
>>> sweep.wait(); sweep.best()                  # the best finished trial: job, value, adapter    # doctest: +SKIP
>>> sweep.trials()                              # every trial: params, job state, metric, seconds # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobs.spec import JobSpecError
from jobs.store import JobRecord, JobStore
from jobs.store.sweep_registry import LIVE_SWEEP, SweepChanged, SweepRecord
from jobs.sweep_spec import load_sweep_spec, parse_sweep_spec, sweep_tracking, trial_spec, validation_configs
from jobs.tracking import TrackingSpec
from jobs.training.subspaces import check_references
from orchestrator.cluster import RAY_TERMINAL, Cluster, launch, stop_and_wait
from orchestrator.feasibility import check_feasible


class Client(Protocol):
    """What sweeps need of ``orchestrator.client.Client`` (which builds them; named here, not imported)."""

    store: JobStore
    home: Path
    cluster: Cluster

    def process_env(self) -> dict[str, str]: ...

    def ray_connected(self) -> bool: ...

    def settle_orphans(self) -> list[JobRecord]: ...

    def cancel(self, job_id: str, *, timeout: float = 120) -> JobRecord: ...

TRIAL_CPU = 0.1  # what a trial's own process reserves; its Ray Train workers reserve the rest
PACKED_TRIAL_CPU = 0.01  # a packed trial's process only follows its job: its base group holds the compute


@dataclass(frozen=True)
class Packing:
    """How a sweep's trials train: ``solo`` says why not packed (None: packed into base groups)."""

    solo: str | None
    trial_cpu: float
    max_concurrent: int | None

    def describe(self) -> str:
        if self.solo:
            return f"solo: {self.solo}"
        return f"packed: up to {self.max_concurrent} trials at once train together in one base group"


def packing(spec: Any) -> Packing:
    """Whether every trial of the sweep can train in a base group (checked over the drawn configurations and
    every bound and choice). A packed sweep runs up to the group's member cap of trials at once (its
    ``max_concurrent`` is bounded by the cap, not by worker slots), so ASHA sees full rungs early."""
    from jobs.training.base_group import default_capacity, packing_problem

    for label, params in validation_configs(spec):
        problem = packing_problem(trial_spec(spec, params, 0, label=label))
        if problem:
            return Packing(f"{label}: {problem}", TRIAL_CPU, spec.max_concurrent)
    cap = default_capacity()
    return Packing(None, PACKED_TRIAL_CPU, min(spec.max_concurrent or cap, cap))


def start_sweep(client: Client, sweep: Any, *, tracking: TrackingSpec | None = None) -> SweepHandle:
    """Validate, store and launch a sweep's driver as a Ray job; see ``Client.tune``. ``tracking``: where the
    sweep is tracked if neither it nor its job spec says (the client's default)."""
    spec = load_sweep_spec(sweep) if isinstance(sweep, (str, os.PathLike)) else parse_sweep_spec(sweep)
    if tracking is not None and sweep_tracking(spec) is None:
        spec = spec.model_copy(update={"tracking": tracking})
    labelled = [(label, trial_spec(spec, params, 0, label=label)) for label, params in validation_configs(spec)]
    specs = [s for _, s in labelled]
    for s in specs:
        check_references(client.store, s)
    largest = max(specs, key=lambda s: s.resources.num_workers * s.resources.cpus_per_worker)
    # Every trial's workers (or base group) must fit (the search space may set their resources). A trial's own
    # process takes a little CPU besides them (lower resources.cpus_per_worker, e.g. to 0.9).
    trial_cpu = packing(spec).trial_cpu
    checked = set()
    for label, s in labelled:
        if s.resources not in checked:
            checked.add(s.resources)
            check_feasible(
                client.cluster,
                s,
                extra_cpus=trial_cpu,
                what=f"sweep {spec.name!r} ({label}: {trial_cpu} CPU for the trial itself besides its workers)",
            )
    record = client.store.sweeps.create(spec)
    submission_id = f"peftfleet-sweep-{record.id}-{uuid.uuid4().hex[:6]}"
    client.store.sweeps.update(
        record.id, runtime={"ray_submission_id": submission_id, "dashboard_url": client.cluster.dashboard_url}
    )
    try:
        _launch_driver(client, record.id, submission_id, largest.resources, resume=False)
    except Exception as e:
        client.store.sweeps.update(
            record.id, state="FAILED", error=f"could not hand the sweep to Ray: {type(e).__name__}: {e}"
        )
        raise
    return SweepHandle(client, record.id)


def _launch_driver(client: Client, sweep_id: str, submission_id: str, resources: Any, *, resume: bool) -> None:
    launch(
        client.cluster,
        f"orchestrator.tune.driver {sweep_id}{' --resume' if resume else ''}",
        submission_id=submission_id,
        resources=resources,
        env=client.process_env(),
        metadata={"peftfleet_sweep": sweep_id},
    )


class SweepHandle:
    """One sweep: its state, trials, best trial; wait, resume and plot."""

    def __init__(self, client: Client, sweep_id: str):
        self._client = client
        self.id = client.store.sweeps.get(sweep_id).id

    def __repr__(self) -> str:
        return f"SweepHandle({self.id[:8]}, {self.record().state})"

    def record(self) -> SweepRecord:
        return self._client.store.sweeps.get(self.id)

    def status(self) -> str:
        """The sweep's state; a live sweep whose Ray job ended without settling it is INTERRUPTED."""
        record = self.record()
        if record.state in LIVE_SWEEP and self._driver_ended(record):
            try:  # only if it is still live under the driver that ended (it may have settled meanwhile)
                record = self._client.store.sweeps.update(
                    self.id, state="INTERRUPTED", error="the sweep's driver ended before the sweep did",
                    expected=LIVE_SWEEP, driver=record.runtime.get("ray_submission_id"),
                )
            except SweepChanged:
                record = self.record()
        return record.state

    def _driver_ended(self, record: SweepRecord) -> bool:
        submission = record.runtime.get("ray_submission_id")
        if not submission or not self._client.ray_connected():
            return False
        return self._client.cluster.ray_job_status(submission) in RAY_TERMINAL and self.record().state in LIVE_SWEEP

    def wait(self, *, timeout: float | None = None, poll_s: float = 2.0) -> SweepRecord:
        """Block until the sweep is SUCCEEDED, FAILED or INTERRUPTED; returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status() in LIVE_SWEEP:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {self.id[:8]} is still {self.record().state} after {timeout} s")
            self._client.settle_orphans()
            time.sleep(poll_s)
        return self.record()

    def trials(self) -> list[dict[str, Any]]:
        """One row per trial: trial id, job, state, params, last metric value, evaluations, seconds."""
        record = self.record()
        rows = []
        for t in self._client.store.sweeps.trials(self.id):
            values = self._client.store.metrics(t.job.id, record.metric)
            end = t.job.finished_at or time.time()
            rows.append(
                {
                    "trial": t.trial_id,
                    "job": t.job.id,
                    "name": t.job.name,
                    "state": t.job.state.value,
                    "params": t.params,
                    record.metric: values[-1].value if values else None,
                    "evaluations": len(values),
                    "seconds": end - (t.job.started_at or t.job.created_at),
                    "group": t.job.runtime.get("base_group"),  # the base group it trained in; None: solo
                }
            )
        return rows

    def best(self) -> dict[str, Any] | None:
        r = self.record()
        return (
            None if r.best_job_id is None else {"job": r.best_job_id, r.metric: r.best_value, "adapter": r.best_adapter}
        )

    def resume(self) -> SweepHandle:
        """Continue a sweep whose driver died (``Tuner.restore``): finished trials are kept."""
        record = self.record()
        if self.status() in LIVE_SWEEP:
            raise ValueError(f"sweep {self.id[:8]} is {record.state}; only an interrupted or failed sweep resumes")
        if not record.experiment_path:
            raise ValueError(f"sweep {self.id[:8]} never started Ray Tune; submit it again")
        spec = record.sweep_spec
        submission_id = f"peftfleet-sweep-{self.id}-{uuid.uuid4().hex[:6]}"
        resources = trial_spec(spec, validation_configs(spec)[0][1], 0).resources
        try:  # one resume wins; a second finds the sweep PENDING again and starts nothing
            self._client.store.sweeps.update(self.id, state="PENDING", error=None, finished_at=None,
                                             runtime={**record.runtime, "ray_submission_id": submission_id},
                                             expected=("INTERRUPTED", "FAILED"))
        except SweepChanged as e:
            raise ValueError(f"{e}: it was resumed or settled meanwhile") from None
        _launch_driver(self._client, self.id, submission_id, resources, resume=True)
        return self

    def cancel(self, *, timeout: float = 120) -> SweepRecord:
        """Stop the sweep's driver (its trials end with it), settle their jobs; the sweep is INTERRUPTED."""
        submission = self.record().runtime.get("ray_submission_id")
        if submission:
            stop_and_wait(self._client.cluster, submission, timeout=timeout)
        for t in self._client.store.sweeps.trials(self.id):
            if not t.job.state.is_terminal:
                self._client.cancel(t.job.id)
        try:
            return self._client.store.sweeps.update(self.id, state="INTERRUPTED", error="cancelled",
                                                    expected=LIVE_SWEEP)
        except SweepChanged:
            return self.record()  # it finished first

    def plot(self, path: str | os.PathLike | None = None) -> Path:
        """Write the sweep's picture (metric over time per trial, metric against each parameter and
        the parameters' importance) as a PNG; default ``<home>/sweeps/<id>.png``."""
        from orchestrator.tune.plot import plot_sweep

        out = Path(path) if path else self._client.home / "sweeps" / f"{self.id}.png"
        return plot_sweep(self._client.store, self.record(), self.trials(), out)


class Sweeps:
    def __init__(self, client: Client):
        self._client = client

    def list(self, *, limit: int | None = 50) -> list[SweepRecord]:
        return self._client.store.sweeps.list(limit=limit)

    def get(self, sweep_id: str) -> SweepHandle:
        return SweepHandle(self._client, sweep_id)


__all__ = ["JobSpecError", "SweepHandle", "Sweeps", "start_sweep"]
