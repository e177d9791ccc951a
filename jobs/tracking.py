"""Experiment tracking: a job's params, metrics and adapter logged to MLflow and/or TensorBoard, beside the store.

    tracking:
      mlflow: {uri: "sqlite:////data/mlflow.db", experiment: trec}   # or http(s)://server:5000, file:/path
      tensorboard: {dir: /data/tb}

:class:`TrackingSpec` is the ``tracking`` field of a job spec or a sweep spec (or ``Client(tracking=...)``'s
default). :class:`TrackedReporter` wraps any :class:`jobs.training.reporter.Reporter`: it forwards every call
unchanged and, on the job's voice only (the rank that records in the store), opens the run at ``started``,
logs metrics as they are reported, uploads the adapter once it is registered and ends the run at
``finished`` (FAILED / KILLED when the job fails or is stopped: use it as a context manager). Solo jobs and
base-group members are wrapped alike, so they log alike. A new attempt of a job continues its run (found by
its ``peftfleet.job_id`` tag); a sweep trial's run is a child of its sweep's run (``parent_run_id``).

Tracking never fails or hangs training: each tracker's calls run in order on a thread of its own; a failure
is logged once as a warning, a tracker that keeps failing is dropped, and the end of a job waits for what is
still queued at most ``PEFTFLEET_TRACKING_FLUSH_S`` seconds (default 60). No Ray here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("peftfleet.tracking")

INSTALL = "pip install 'peftfleet[tracking]'"
JOB_TAG = "peftfleet.job_id"
SWEEP_TAG = "peftfleet.sweep_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child run under its parent
MLFLOW_SCHEMES = ("file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")
MAX_FAILURES = 3  # consecutive failed calls after which a tracker is dropped for the rest of the job
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def flush_timeout_s() -> float:
    return float(os.environ.get("PEFTFLEET_TRACKING_FLUSH_S", "60"))


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"the {package} package is not installed: {INSTALL}")


def _has_scheme(value: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) is not None and not re.match(r"^[A-Za-z]:[\\/]", value)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def resolve_mlflow_uri(uri: str) -> str:
    """``uri`` checked, with a relative local path made absolute (workers run elsewhere than the submitter)."""
    uri = uri.strip()
    if not _has_scheme(uri):
        raise ValueError(f"{uri!r} is not a URI; give e.g. sqlite:///path/mlflow.db, file:/path/mlruns or "
                         "http(s)://server:5000")
    if re.match(r"^[\w.+-]+://[^/@]*:[^/@]*@", uri):
        raise ValueError("holds a password; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                         "MLFLOW_TRACKING_TOKEN) in the workers' environment instead")
    scheme = uri.split(":", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base not in MLFLOW_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}; one of {list(MLFLOW_SCHEMES)}")
    if base == "sqlite":
        if not uri.startswith("sqlite:///") or uri in ("sqlite:///", "sqlite:///:memory:"):
            raise ValueError("an SQLite URI names a file: sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") else "sqlite:///" + _absolute(path)
    if base == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError("a file URI names a local (or shared) folder: file:/path or file:///path")
        if not parts.path:
            raise ValueError("a file URI names a folder: file:/path/mlruns")
        return Path(_absolute(parts.path)).as_uri()
    if base in ("http", "https") and not urlsplit(uri).netloc:
        raise ValueError(f"{uri!r} names no server; e.g. http://mlflow:5000")
    return uri


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MlflowSpec(_Spec):
    uri: str = Field(description="Tracking URI: sqlite:///path.db, file:/path/mlruns, http(s)://server, databricks.")
    experiment: str = Field(default="peftfleet", min_length=1, max_length=500, description="Experiment name.")
    run_name: str | None = Field(default=None, min_length=1, max_length=250, description="Default: the job name.")
    tags: dict[str, str] = Field(default_factory=dict, max_length=32, description="Extra tags on the run.")
    artifact_location: str | None = Field(
        default=None, min_length=1,
        description="Where a new experiment keeps artifacts (default: the tracking server's; for sqlite and file "
        "URIs a folder `mlartifacts` next to the database / the mlruns folder).",
    )
    parent_run_id: str | None = Field(
        default=None, description="Nest the run under this run (a sweep's driver sets it for its trials)."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        _require("mlflow")
        return resolve_mlflow_uri(v)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for k, value in v.items():
            if not 1 <= len(k) <= 250 or k.startswith(("mlflow.", "peftfleet.")):
                raise ValueError(f"tag {k[:60]!r}: 1–250 characters, not starting with 'mlflow.' or 'peftfleet.'")
            if len(value) > 5000:
                raise ValueError(f"tag {k!r}: value longer than 5000 characters")
        return v

    @field_validator("artifact_location")
    @classmethod
    def _artifacts(cls, v: str | None) -> str | None:
        if v is None or _has_scheme(v):
            return v
        return Path(_absolute(v)).as_uri()

    @field_validator("parent_run_id")
    @classmethod
    def _parent(cls, v: str | None) -> str | None:
        if v is not None and not _RUN_ID.fullmatch(v):
            raise ValueError("an MLflow run id: letters, digits, '_' and '-', at most 64")
        return v

    def default_artifacts(self) -> str | None:
        """Where a new experiment's artifacts go: ``artifact_location``, else beside a local store (never
        MLflow's default ``./mlruns`` relative to whichever worker created the experiment)."""
        if self.artifact_location or not self.uri.startswith(("sqlite:", "file:")):
            return self.artifact_location
        where = Path(self.uri[len("sqlite:///"):]).parent if self.uri.startswith("sqlite:") else Path(
            urlsplit(self.uri).path)
        return (where / "mlartifacts").as_uri()


class TensorBoardSpec(_Spec):
    dir: str = Field(min_length=1, description="A local (or shared) folder; each job writes <dir>/<name>-<id>.")

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        _require("tensorboard")
        if _has_scheme(v):
            raise ValueError("a folder path, not a URL (workers on other nodes need a shared filesystem)")
        if "\x00" in v:
            raise ValueError("a folder path without NUL characters")
        path = Path(_absolute(v))
        if path.exists() and not path.is_dir():
            raise ValueError(f"{str(path)[:200]!r} exists and is not a folder")
        return str(path)


class TrackingSpec(_Spec):
    """Where a job's (or every trial's) params, metrics and adapter are logged besides the store."""

    mlflow: MlflowSpec | None = Field(default=None, description="Log to an MLflow tracking server or store.")
    tensorboard: TensorBoardSpec | None = Field(default=None, description="Write TensorBoard event files.")

    @model_validator(mode="after")
    def _something(self) -> TrackingSpec:
        if self.mlflow is None and self.tensorboard is None:
            raise ValueError("name at least one tracker: mlflow or tensorboard")
        return self

    def with_parent(self, run_id: str | None) -> TrackingSpec:
        """This spec with its MLflow run nested under ``run_id`` (a sweep's run)."""
        if run_id is None or self.mlflow is None:
            return self
        return self.model_copy(update={"mlflow": self.mlflow.model_copy(update={"parent_run_id": run_id})})


def flat_params(spec: Any, job_id: str) -> dict[str, str]:
    """The job spec flattened to dotted keys (``method.r``, ``training.lr``, ``dataset.name``...) plus its id."""
    data = spec.model_dump(mode="json", exclude={"tracking", "idempotency_key"})
    out = {"job_id": job_id}
    _flatten("", data, out)
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# -- trackers ----------------------------------------------------------------------------------------------
class Tracker(Protocol):
    """One backend's run of one job (or sweep). Its calls come from one thread, in order."""

    name: str

    def open(self, params: dict[str, str], step: int) -> str | None:
        """Start the run, or continue the one an earlier attempt started; its id (None: no ids here)."""

    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log_artifacts(self, folder: str, path: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str) -> None:
        """End the run: FINISHED, FAILED or KILLED."""


class MlflowTracker:
    """A run in MLflow, through its own client (``MlflowClient``: no process-global active run, so many jobs
    in one process — a base group, a sweep's driver — each log to their own). ``key`` is the tag that finds
    the run again (``peftfleet.job_id`` or ``peftfleet.sweep_id``)."""

    name = "mlflow"

    def __init__(self, spec: MlflowSpec, *, key: tuple[str, str], run_name: str, tags: dict[str, str] | None = None):
        self.spec, self.key, self.run_name = spec, key, spec.run_name or run_name
        self.tags = {**spec.tags, **(tags or {}), key[0]: key[1]}
        if spec.parent_run_id:
            self.tags[PARENT_TAG] = spec.parent_run_id
        self.client: Any = None
        self.run_id: str | None = None

    def connect(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.spec.uri)

    def open(self, params: dict[str, str], step: int) -> str:
        from mlflow.entities import Param

        self.connect()
        experiment = self._experiment()
        found = self.client.search_runs([experiment], filter_string=f"tags.`{self.key[0]}` = '{self.key[1]}'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        if found:  # an earlier attempt's run: continue it
            run = found[0]
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            have = run.data.params
        else:
            self.run_id = self.client.create_run(experiment, tags=self.tags, run_name=self.run_name).info.run_id
            have = {}
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        new = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        return self.run_id

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.spec.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.spec.experiment, artifact_location=self.spec.default_artifacts())
        except Exception:  # created meanwhile by another job
            found = self.client.get_experiment_by_name(self.spec.experiment)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, folder: str, path: str) -> None:
        self.client.log_artifacts(self.run_id, folder, artifact_path=path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def end_children(self, status: str) -> None:
        """End this run's children still RUNNING (trials whose workers were killed before they could)."""
        self.end_running(f"tags.`{PARENT_TAG}` = '{self.run_id}'", status)

    def end_running(self, filter_string: str, status: str) -> None:
        """End with ``status`` every run of the experiment that ``filter_string`` finds still RUNNING."""
        for run in self.client.search_runs([self._experiment()], filter_string=filter_string):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status=status)


class TensorBoardTracker:
    """Event files under ``<dir>/<run name>``; a resumed attempt purges what the old one wrote past its
    checkpoint's step (``purge_step``), so curves do not fold back."""

    name = "tensorboard"

    def __init__(self, spec: TensorBoardSpec, *, run_name: str):
        self.folder = os.path.join(spec.dir, run_name)
        self.writer: Any = None

    def open(self, params: dict[str, str], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.folder, purge_step=step or None)
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("params", "| param | value |\n|---|---|\n" + rows, global_step=step)
        return None

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), global_step=step)

    def log_artifacts(self, folder: str, path: str) -> None:
        pass  # event files hold scalars and text; the adapter lives in the registry

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", "\n".join(f"{k}: {v}" for k, v in tags.items()))

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class Channel:
    """A tracker's calls, in order, on a daemon thread of its own: the caller never waits for the backend.
    A failure is warned about once; after :data:`MAX_FAILURES` in a row (or a failed ``open``) the tracker is
    dropped and what follows is discarded (its cleanups still run)."""

    def __init__(self, tracker: Any, what: str):
        self.tracker, self.what = tracker, what
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failures, self._warned, self.dropped = 0, False, False
        self._thread = threading.Thread(target=self._run, name=f"peftfleet-{tracker.name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any], cleanup: Callable[[], None] | None = None, *, essential: bool = False,
               then: Callable[[Any], None] | None = None) -> None:
        """Queue ``call``; ``essential``: its failure drops the tracker; ``then`` gets its result."""
        self._queue.put((call, cleanup, essential, then))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            call, cleanup, essential, then = item
            try:
                if self.dropped:
                    continue
                try:
                    result = call()
                except Exception as e:  # noqa: BLE001 - a tracker never fails the job
                    self._failures += 1
                    self.dropped = essential or self._failures >= MAX_FAILURES
                    self._warn(e)
                    continue
                self._failures = 0
                if then is not None:
                    try:
                        then(result)
                    except Exception as e:  # noqa: BLE001 - e.g. the store, while recording the run id
                        self._warn(e)
            finally:
                if cleanup is not None:
                    cleanup()

    def _warn(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("peftfleet: %s tracking of %s failed (%s: %s); training goes on%s", self.tracker.name,
                        self.what, type(error).__name__, str(error)[:500], ", without it" if self.dropped else "")

    def shutdown(self, timeout: float | None) -> None:
        """No more calls; wait up to ``timeout`` seconds (None: do not wait) for the queued ones."""
        self._queue.put(None)
        if timeout is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("peftfleet: %s tracking of %s still busy after %.0f s; not waiting for it",
                        self.tracker.name, self.what, timeout)


def status_for(error: BaseException | None, stopped: tuple[type[BaseException], ...] = ()) -> str:
    """MLflow's run status for a job that ended with ``error``: KILLED for a stop (an interrupt, or one of
    ``stopped``: e.g. the store's ``OwnershipLost``, the job settled elsewhere), else FAILED."""
    if error is None:
        return "FINISHED"
    if isinstance(error, (KeyboardInterrupt, SystemExit, *stopped)):
        return "KILLED"
    return "FAILED"


def trackers_for(tracking: TrackingSpec | None, *, key: tuple[str, str], run_name: str, folder: str | None = None,
                 tags: dict[str, str] | None = None) -> list[Any]:
    """The trackers ``tracking`` names, for the run keyed by ``key``: MLflow's named ``run_name`` (unless the
    spec names it), TensorBoard's in ``<dir>/<folder>`` (default ``run_name``)."""
    if tracking is None:
        return []
    out: list[Any] = []
    if tracking.mlflow is not None:
        out.append(MlflowTracker(tracking.mlflow, key=key, run_name=run_name, tags=tags))
    if tracking.tensorboard is not None:
        out.append(TensorBoardTracker(tracking.tensorboard, run_name=folder or run_name))
    return out


class TrackedReporter:
    """A :class:`jobs.training.reporter.Reporter` that forwards every call to ``inner`` unchanged and, when
    ``voice`` (the rank that records in the store), logs to the trackers of ``spec.tracking``. Use it as a
    context manager around the recipe: an exception out of it ends the run FAILED (KILLED for a stop).
    ``store``: where the MLflow run id is recorded in the job's runtime (``mlflow_run_id``), if given;
    ``stopped``: the exceptions that mean the job was stopped, not broken (its run ends KILLED).
    ``wait``: whether the end of the job waits (bounded) for queued tracking calls — a worker process about
    to exit does; a base group, which trains on, does not."""

    def __init__(self, inner: Any, spec: Any, job_id: str, *, voice: bool, store: Any = None, wait: bool = True,
                 stopped: tuple[type[BaseException], ...] = (), trackers: list[Any] | None = None):
        self.inner, self.spec, self.job_id, self.store, self.wait = inner, spec, job_id, store, wait
        self.stopped = stopped
        tracking = getattr(spec, "tracking", None)
        if trackers is None:
            trackers = trackers_for(tracking, key=(JOB_TAG, job_id), run_name=spec.name,
                                    folder=f"{spec.name}-{job_id[:8]}",
                                    tags={"peftfleet.job_name": spec.name, "peftfleet.method": spec.method_name})
        what = f"job {job_id[:8]}"
        self._channels = [Channel(t, what) for t in trackers] if voice else []
        self._open = False
        self._logged: tuple[int, set[str]] = (-1, set())  # the step last logged and its keys

    # -- passed through --------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> str | None:
        return self.inner.checkpoint_root

    @property
    def held(self) -> bool:
        return self.inner.held

    def __getattr__(self, name: str) -> Any:  # the inner reporter's own attributes (store, attempt, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def checkpoint_to_resume(self):
        return self.inner.checkpoint_to_resume()

    def checkpoint_saved(self, step: int, files: dict[str, str]) -> None:
        self.inner.checkpoint_saved(step, files)

    def checkpoint_record(self, job_id: str, step: int) -> dict[str, str] | None:
        return self.inner.checkpoint_record(job_id, step)

    def hold(self, step: int) -> None:
        self.inner.hold(step)

    # -- forwarded, then tracked -----------------------------------------------------------------------
    def started(self, *, step: int, total_steps: int, resumed: bool, summary: dict[str, float]) -> None:
        self.inner.started(step=step, total_steps=total_steps, resumed=resumed, summary=summary)
        if not self._channels or self._open:
            return
        self._open = True
        params = flat_params(self.spec, self.job_id)
        for channel in self._channels:
            tracker = channel.tracker
            then = self._record_run if isinstance(tracker, MlflowTracker) else None
            channel.submit(lambda t=tracker: t.open(params, step), essential=True, then=then)
        self._log(step, {**({"resumed_from_step": step} if step else {}), **summary})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.inner.metrics(step, values)
        self._log(step, values)

    def progress(self, step: int, metrics: dict[str, float], checkpoint: str | None = None) -> None:
        self.inner.progress(step, metrics, checkpoint)
        seen = self._logged[1] if self._logged[0] == step else set()
        self._log(step, {k: v for k, v in metrics.items() if k not in seen})  # the recipe reported most already

    def register_adapter(self, folder: str, metrics: dict[str, float]) -> str:
        name = self.inner.register_adapter(folder, metrics)
        mlflow = [c for c in self._channels if isinstance(c.tracker, MlflowTracker)]
        if mlflow:  # the recipe deletes its folder once this returns: upload a copy
            copy = shutil.copytree(folder, tempfile.mkdtemp(prefix="peftfleet-track-"), dirs_exist_ok=True)
            for channel in mlflow:
                channel.submit(lambda t=channel.tracker: t.log_artifacts(copy, "adapter"),
                               cleanup=lambda: shutil.rmtree(copy, ignore_errors=True))
        for channel in self._channels:
            channel.submit(lambda t=channel.tracker: t.set_tags({"peftfleet.adapter": name}))
        return name

    def finished(self, step: int, metrics: dict[str, float], adapter: str | None) -> None:
        self.inner.finished(step, metrics, adapter)
        self.close("FINISHED")

    # -- the run's end ------------------------------------------------------------------------------------
    def close(self, status: str | None, *, wait: bool | None = None) -> None:
        """End the run with ``status`` (FINISHED, FAILED, KILLED; None: leave it open — a paused member
        continues it later) and stop the trackers' threads. Idempotent."""
        channels, self._channels = self._channels, []
        wait = self.wait if wait is None else wait
        for channel in channels:
            if status is not None and self._open:
                channel.submit(lambda t=channel.tracker: t.close(status))
            channel.shutdown(flush_timeout_s() if wait else None)

    def close_for(self, error: BaseException | None) -> None:
        """End the run as a job that ended with ``error`` ends (None: FINISHED)."""
        self.close(status_for(error, self.stopped))

    def __enter__(self) -> TrackedReporter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close_for(error)

    def _log(self, step: int, values: dict[str, float]) -> None:
        if not self._channels or not values:
            return
        values = dict(values)
        seen = self._logged[1] if self._logged[0] == step else set()
        self._logged = (step, seen | set(values))
        for channel in self._channels:
            channel.submit(lambda t=channel.tracker: t.log_metrics(step, values))

    def _record_run(self, run_id: str) -> None:
        if self.store is not None:
            self.store.set_runtime(self.job_id, mlflow_run_id=run_id)


class RunTracking:
    """A run that is not a job's: a sweep's parent run. Opened synchronously (its id names the trials'
    parent) but bounded by ``timeout`` seconds; every failure is a warning."""

    def __init__(self, tracking: TrackingSpec | None, *, key: tuple[str, str], run_name: str,
                 tags: dict[str, str] | None = None):
        self.channels = [Channel(t, f"{key[0].rsplit('.', 1)[-1]} {key[1][:8]}")
                         for t in trackers_for(tracking, key=key, run_name=run_name, tags=tags)]
        self.run_id: str | None = None

    def open(self, params: dict[str, str], *, timeout: float = 30.0) -> str | None:
        """Start (or continue) the run; its MLflow id, or None (no MLflow, or it did not answer in time)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def got(run_id: Any) -> None:
            box["id"] = run_id
            done.set()

        for channel in self.channels:
            is_mlflow = isinstance(channel.tracker, MlflowTracker)
            channel.submit(lambda t=channel.tracker: t.open(params, 0), essential=True,
                           then=got if is_mlflow else None, cleanup=done.set if is_mlflow else None)
        if any(isinstance(c.tracker, MlflowTracker) for c in self.channels):
            done.wait(timeout)
        self.run_id = box.get("id")
        return self.run_id

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for channel in self.channels:
            channel.submit(lambda t=channel.tracker: t.log_metrics(step, values))

    def set_tags(self, tags: dict[str, str]) -> None:
        for channel in self.channels:
            channel.submit(lambda t=channel.tracker: t.set_tags(tags))

    def close(self, status: str, *, children: str | None = None) -> None:
        """End the run with ``status``; ``children``: first end its child runs still RUNNING with that status."""
        channels, self.channels = self.channels, []
        for channel in channels:
            if children is not None and isinstance(channel.tracker, MlflowTracker):
                channel.submit(lambda t=channel.tracker: t.end_children(children))
            channel.submit(lambda t=channel.tracker: t.close(status))
            channel.shutdown(flush_timeout_s())


def end_job_run(tracking: TrackingSpec | None, job_id: str, status: str, *, timeout: float = 10.0) -> None:
    """End job ``job_id``'s MLflow run with ``status`` if it is still RUNNING: a job whose workers were killed
    (a sweep's scheduler stopped it) never ended its own run. Bounded by ``timeout``; failures are warnings."""
    if tracking is None or tracking.mlflow is None:
        return
    tracker = MlflowTracker(tracking.mlflow, key=(JOB_TAG, job_id), run_name=job_id)

    def end() -> None:
        tracker.connect()
        tracker.end_running(f"tags.`{JOB_TAG}` = '{job_id}'", status)

    channel = Channel(tracker, f"job {job_id[:8]}")
    channel.submit(end)
    channel.shutdown(timeout)
