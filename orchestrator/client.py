"""The Python client: submit fine-tuning jobs to Ray, follow them, and find their adapters.

>>> from orchestrator import Client
>>> client = Client()                                    # local Ray + default store   # doctest: +SKIP
>>> job = client.submit("job.yaml")                      # or a dict / JobSpec          # doctest: +SKIP
>>> job.wait(timeout=600)                                # progress bar when interactive # doctest: +SKIP
>>> job.metrics("eval_accuracy")[-1].value                                              # doctest: +SKIP
0.88
>>> client.adapters.list(base="minilm")                                                 # doctest: +SKIP
>>> client.subspaces.list(base="minilm")                 # IPT subspaces                # doctest: +SKIP

On a cluster: ``Client(address="ray://head:10001" or "auto", store_url="postgresql+psycopg2://...",
storage_url="s3://bucket/peftfleet")``. Another process finds a job with
``Client(store_url=...).jobs.get(job_id)`` and can wait on it; only submitting, cancelling and
reading logs talk to Ray.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.adapter_registry import AdapterRecord, AdapterRegistry
from jobs.home import peftfleet_home
from jobs.spec import JobSpec, JobSpecError, load_job_spec, parse_job_spec
from jobs.states import ALLOWED, JobState
from jobs.store import JobRecord, JobStore, Metric
from jobs.subspace_registry import SubspaceRecord, SubspaceRegistry
from jobs.subspaces import check_references
from orchestrator.cluster import JOB_ENV, Cluster, connect
from orchestrator.reconciler import settle_orphans

if TYPE_CHECKING:
    from orchestrator.serving.deployment import Serving
    from orchestrator.sweeps import SweepHandle

RAY_TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}


class InfeasibleJob(ValueError):
    """The cluster can never give the job the resources it asks for."""


class JobHandle:
    """One job: its state, metrics, logs and adapter. Get one from ``Client.submit`` or ``client.jobs.get``."""

    def __init__(self, client: Client, job_id: str):
        self._client = client
        self.id = client.store.get(job_id).id

    def __repr__(self) -> str:
        return f"JobHandle({self.id[:8]}, {self.status()})"

    def record(self) -> JobRecord:
        return self._client.store.get(self.id)

    def status(self) -> JobState:
        return self.record().state

    def metrics(self, name: str | None = None) -> list[Metric]:
        return self._client.store.metrics(self.id, name)

    def adapter(self) -> AdapterRecord | None:
        """The adapter this job registered, once it has."""
        found = self._client.adapters.list(job_id=self.id)
        return found[0] if found else None

    def subspace(self) -> SubspaceRecord | None:
        """The IPT subspace an ``ipt-subspace`` job registered, once it has."""
        return next((s for s in self._client.subspaces.list() if s.job_id == self.id), None)

    def wait(self, timeout: float | None = None, *, poll_s: float = 1.0, progress: bool | None = None) -> JobRecord:
        """Block until the job is terminal; returns its record. Raises ``TimeoutError``.

        Shows a progress bar (steps, loss, ETA) when ``progress`` is true, or by default when
        stderr is a terminal.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        show = sys.stderr.isatty() if progress is None else progress
        bar = None
        try:
            while True:
                job = self.record()
                if show:
                    bar = self._update_bar(bar)
                if job.state.is_terminal:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id[:8]} is still {job.state} after {timeout} s")
                if job.state is not JobState.PENDING or job.runtime:
                    self._client.settle_orphans()
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def _update_bar(self, bar):
        from tqdm import tqdm

        total = [m.value for m in self.metrics("total_steps")]
        losses = self.metrics("train_loss")
        if not total:
            return bar
        if bar is None:
            bar = tqdm(total=int(total[-1]), desc=f"job {self.id[:8]}", unit="step", file=sys.stderr)
        if losses:
            bar.update(losses[-1].step - bar.n)
            bar.set_postfix(loss=f"{losses[-1].value:.4f}", refresh=False)
        return bar

    def logs(self) -> str:
        """Everything the job's processes printed (driver and Ray Train workers)."""
        cache = peftfleet_home(self._client.store.home) / "logs" / f"{self.id}.log"
        submission = self.record().runtime.get("ray_submission_id")
        if submission is None:
            return ""
        try:
            text = self._client.cluster.jobs_client().get_job_logs(submission)
        except Exception as e:  # noqa: BLE001 - fall back to the last copy we saw
            if cache.exists():
                return cache.read_text()
            raise RuntimeError(f"logs of job {self.id[:8]} are not reachable on Ray ({e}) and no copy was kept") from e
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(text)
        return text

    def cancel(self, timeout: float = 120) -> JobRecord:
        """Stop the job: its Ray work is killed and its resources freed; then it is CANCELLED."""
        return self._client.cancel(self.id, timeout=timeout)


class Jobs:
    """``client.jobs``: list and look up jobs in the store."""

    def __init__(self, client: Client):
        self._client = client

    def list(self, *, state: Any = None, name: str | None = None, task_name: str | None = None, limit: int | None = 100) -> list[JobRecord]:
        return self._client.store.list_jobs(state=state, name=name, task_name=task_name, limit=limit)

    def get(self, job_id: str) -> JobHandle:
        """A handle to a job by id or unique prefix (any process, any client)."""
        return JobHandle(self._client, job_id)


class Client:
    """Submit and follow peftfleet jobs.

    Args:
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``RAY_ADDRESS``); default:
            reuse this process's Ray or start a local cluster on first use.
        store_url: SQLAlchemy URL of the job store (default SQLite under ``PEFTFLEET_HOME``).
        storage_url: artifact storage (default ``PEFTFLEET_HOME/artifacts``; an fsspec URL on clusters).
        home: peftfleet's local folder (default ``$PEFTFLEET_HOME`` or ``~/.peftfleet``).
        num_cpus: CPUs of a local cluster started here (default: all).
        heartbeat_timeout_s: a live job whose owner was silent this long is settled as FAILED.
        resubmit_orphans: instead of FAILED, give such a job up to this many new owners, each resuming
            from its last checkpoint (default ``$PEFTFLEET_RESUBMIT_ORPHANS`` or 0).
    """

    def __init__(
        self, *, address: str | None = None, store_url: str | None = None, storage_url: str | None = None,
        home: str | os.PathLike | None = None, num_cpus: int | None = None, heartbeat_timeout_s: float = 120,
        resubmit_orphans: int | None = None,
    ):
        self.home = Path(peftfleet_home(home))
        self.store = JobStore(store_url, storage_url=storage_url, home=self.home)
        self.jobs = Jobs(self)
        from orchestrator.sweeps import Sweeps

        self.sweeps = Sweeps(self)
        self.adapters: AdapterRegistry = self.store.adapters
        self.subspaces: SubspaceRegistry = self.store.subspaces
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.resubmit_orphans = int(os.environ.get("PEFTFLEET_RESUBMIT_ORPHANS", "0")) if resubmit_orphans is None else resubmit_orphans
        self._address, self._num_cpus, self._cluster = address, num_cpus, None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = connect(self._address, num_cpus=self._num_cpus)
        return self._cluster

    def submit(self, spec: JobSpec | dict | str | os.PathLike, *, idempotency_key: str | None = None) -> JobHandle:  # type: ignore[valid-type]
        """Validate, store and schedule a job; returns at once with a handle.

        Raises ``JobSpecError`` or ``InfeasibleJob`` before anything is stored or scheduled.
        """
        spec = load_job_spec(spec) if isinstance(spec, (str, os.PathLike)) else parse_job_spec(spec)
        check_references(self.store, spec)
        self._check_feasible(spec)
        job = self.store.submit(spec, idempotency_key=idempotency_key)
        if job.runtime.get("ray_submission_id"):
            return JobHandle(self, job.id)  # an idempotent resubmission: already scheduled
        submission_id = f"peftfleet-{job.id}"
        self.store.set_runtime(job.id, ray_submission_id=submission_id, dashboard_url=self.cluster.dashboard_url)
        try:
            self._launch(f"orchestrator.runner {job.id} ray-job:{submission_id}", submission_id, spec.resources,
                         {"peftfleet_job": job.id, "name": spec.name})
        except Exception as e:
            self.store.transition(job.id, JobState.FAILED, reason="could not hand the job to Ray", error=f"{type(e).__name__}: {e}")
            raise
        return JobHandle(self, job.id)

    def _launch(self, module_args: str, submission_id: str, resources, metadata: dict[str, str]) -> None:
        """Start ``python -m <module_args>`` as a Ray job with peftfleet's environment."""
        env = {
            **JOB_ENV,
            "PEFTFLEET_STORE_URL": self.store.url,
            "PEFTFLEET_STORAGE_URL": self.store.artifacts.url,
            "PEFTFLEET_HOME": str(self.home),
            "PEFTFLEET_SUBMISSION_ID": submission_id,
            "DS_ACCELERATOR": "cuda" if resources.gpus_per_worker else "cpu",
            "OMP_NUM_THREADS": str(max(1, int(resources.cpus_per_worker))),
        }
        for passthrough in ("PEFTFLEET_HEARTBEAT_INTERVAL_S", "PEFTFLEET_MAX_FAILURES", "PEFTFLEET_CHECKPOINT_URL", "RAY_AUTH_MODE"):
            if passthrough in os.environ:
                env[passthrough] = os.environ[passthrough]
        python = os.environ.get("PEFTFLEET_RUNNER_PYTHON") or (sys.executable if self.cluster.started_here or self._address in (None, "auto") else "python")
        self.cluster.jobs_client().submit_job(
            entrypoint=f"{python} -m {module_args}", submission_id=submission_id, runtime_env={"env_vars": env},
            entrypoint_num_cpus=0, metadata=metadata,
        )

    # -- sweeps ----------------------------------------------------------------------------
    def tune(
        self, spec: JobSpec | dict | str | os.PathLike, *, search_space: dict[str, Any], metric: str = "eval_accuracy",  # type: ignore[valid-type]
        mode: str = "max", num_samples: int = 8, scheduler: str = "asha", max_concurrent: int | None = None,
        name: str | None = None, seed: int = 0, promote: bool = False, scheduler_options: dict[str, float] | None = None,
    ) -> SweepHandle:
        """Search ``search_space`` (dotted spec paths -> distributions, see ``jobs.sweep_spec``) around the
        job ``spec`` with Ray Tune; every trial is a job in the store. Returns at once with a handle.

        Raises ``JobSpecError`` (an invalid space or any invalid trial spec) or ``InfeasibleJob``
        before anything is stored or scheduled."""
        job_spec = load_job_spec(spec) if isinstance(spec, (str, os.PathLike)) else parse_job_spec(spec)
        return self.submit_sweep({
            "name": name or f"{job_spec.name}-sweep", "spec": job_spec.model_dump(mode="json"),
            "search_space": search_space, "metric": metric, "mode": mode, "num_samples": num_samples, "scheduler": scheduler,
            "max_concurrent": max_concurrent, "seed": seed, "promote": promote, "scheduler_options": scheduler_options or {},
        })

    def submit_sweep(self, sweep: dict | str | os.PathLike) -> SweepHandle:
        """Validate, store and start a sweep (a mapping or a sweep YAML file); see :meth:`tune`."""
        from orchestrator.sweeps import start_sweep

        return start_sweep(self, sweep)

    def _check_feasible(self, spec) -> None:
        total = self.cluster.resources()
        r = spec.resources
        need = {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}
        short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
        if short:
            detail = ", ".join(f"{v:g} {k} (the cluster has {have:g})" for k, (v, have) in short.items())
            raise InfeasibleJob(f"job {spec.name!r} needs {detail}; lower resources.num_workers or its per-worker resources")

    def cancel(self, job_id: str, *, timeout: float = 120) -> JobRecord:
        job = self.store.get(job_id)
        if job.state.is_terminal:
            return job
        submission = job.runtime.get("ray_submission_id")
        if job.state is JobState.PENDING and not submission:
            return self.store.transition(job.id, JobState.CANCELLED, reason="cancelled before scheduling")
        if job.state is not JobState.CANCELLING and JobState.CANCELLING in ALLOWED[job.state]:
            job = self.store.transition(job.id, JobState.CANCELLING, reason="cancel requested")
        if submission:
            jobs_client = self.cluster.jobs_client()
            jobs_client.stop_job(submission)
            deadline = time.monotonic() + timeout
            while str(jobs_client.get_job_status(submission)) not in RAY_TERMINAL:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray job {submission} did not stop within {timeout} s")
                time.sleep(0.5)
        job = self.store.get(job.id)
        if not job.state.is_terminal:  # the runner was killed before it could settle the job itself
            job = self.store.transition(job.id, JobState.CANCELLED, reason="Ray job stopped")
        return job

    def serve(
        self, base: str, *, adapters: list[str] | str = "all", task: str | None = None, capacity: int = 32,
        num_replicas: int = 1, autoscaling: dict[str, Any] | None = None, api_key: str | None = None,
        host: str = "127.0.0.1", port: int = 8000, name: str = "peftfleet", route_prefix: str = "/", max_batch_size: int = 32,
        batch_wait_s: float = 0.01, cpus_per_replica: float = 1, gpus_per_replica: float = 0,
    ) -> Serving:
        """Serve ``adapters`` (names, or ``"all"`` registered for ``base``, now and later) from one copy
        of ``base`` per replica, over an OpenAI-shaped HTTP API; prints and returns the URL.

        ``task`` defaults to causal-lm for decoder bases and sequence-classification otherwise.
        ``autoscaling`` is Ray Serve's autoscaling_config (min_replicas, max_replicas, ...)."""
        from orchestrator.serving.deployment import ServeOptions, start

        base_record = self.store.register_base_model(base)
        task = task or default_task(base_record.path)
        names = None if adapters == "all" else list(adapters)
        for adapter in names or []:
            record = self.adapters.get(adapter)  # AdapterNotFound names it
            if record.base_fingerprint != base_record.fingerprint:
                raise ValueError(f"adapter {adapter!r} was trained on another base than {base!r}")
            if record.task != task:
                raise ValueError(f"adapter {adapter!r} is a {record.task} adapter; this server serves {task}")
        options = ServeOptions(base, task, names, capacity, max_batch_size, batch_wait_s, api_key,
                               self.store.url, self.store.artifacts.url, str(self.home))
        self.cluster  # noqa: B018 - connect (or start the local cluster) first
        env = {**JOB_ENV, "PEFTFLEET_HOME": str(self.home), "OMP_NUM_THREADS": str(max(1, int(cpus_per_replica)))}
        serving = start(options, name=name, host=host, port=port, route_prefix=route_prefix, num_replicas=num_replicas, autoscaling=autoscaling,
                        cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, env=env)
        print(f"serving {base} ({task}; adapters: {', '.join(names) if names is not None else 'all registered'}) at {serving.url}/v1", flush=True)
        return serving

    def settle_orphans(self) -> list[JobRecord]:
        """Settle live jobs whose owner stopped heartbeating (see ``orchestrator.reconciler``)."""
        jobs_client = None
        if self._cluster is not None:
            jobs_client = self._cluster.jobs_client()
        resubmit = self._resubmit if self.resubmit_orphans and self._cluster is not None else None
        return settle_orphans(self.store, timeout_s=self.heartbeat_timeout_s, jobs_client=jobs_client, resubmit=resubmit,
                              max_attempts=self.resubmit_orphans)

    def _resubmit(self, job_id: str) -> None:
        """A new owner (runner) for a job whose owner died; Ray Train resumes it from its last checkpoint."""
        job = self.store.get(job_id)
        submission_id = f"peftfleet-{job.id}-a{job.attempt}-{int(time.time())}"
        self.store.set_runtime(job.id, ray_submission_id=submission_id)
        try:
            self._launch(f"orchestrator.runner {job.id} ray-job:{submission_id}", submission_id, job.job_spec.resources,
                         {"peftfleet_job": job.id, "name": job.name})
        except Exception as e:
            self.store.transition(job.id, JobState.FAILED, reason="could not hand the job back to Ray", error=f"{type(e).__name__}: {e}")
            raise


def default_task(base_folder: str | os.PathLike) -> str:
    """causal-lm for decoder-only bases (by their config's architectures), else sequence-classification."""
    import json

    config = json.loads((Path(base_folder) / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or []) or config.get("model_type") in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo")
    return "causal-lm" if causal else "sequence-classification"


__all__ = ["Client", "InfeasibleJob", "JobHandle", "JobSpecError"]
