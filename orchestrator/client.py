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
storage_url="s3://bucket/peftfleet", secrets="cluster")``. Another process finds a job with
``Client(store_url=...).jobs.get(job_id)`` and can wait on it; only submitting, cancelling and
reading logs talk to Ray. Secrets (a store URL's password, the Serve API key) never travel in a Ray
runtime env: see :func:`orchestrator.cluster.secret_env` and docs/security.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orchestrator.quiet as quiet
from jobs.home import peftfleet_home
from jobs.secrets import has_password, redact
from jobs.spec import JobSpec, JobSpecError, load_job_spec, parse_job_spec
from jobs.states import ALLOWED, IllegalTransition, JobState
from jobs.store import JobRecord, JobStore, Metric
from jobs.store.adapter_registry import AdapterRecord, AdapterRegistry
from jobs.store.subspace_registry import SubspaceRecord, SubspaceRegistry
from jobs.tracking import TrackingSpec
from jobs.training.subspaces import check_references
from orchestrator.cluster import JOB_ENV, SECRETS_MODES, Cluster, connect, secret_env, stop_and_wait
from orchestrator.feasibility import InfeasibleJob, check_feasible
from orchestrator.reconciler import hand_to_ray, resubmit, settle_orphans
from orchestrator.tune.sweeps import SweepHandle, Sweeps, start_sweep

if TYPE_CHECKING:
    from orchestrator.serving.deployment import Serving


class JobHandle:
    """One job: its state, metrics, logs and adapter. Get one from ``Client.submit`` or ``client.jobs.get``."""

    def __init__(self, client: Client, job_id: str):
        self._client = client
        self.id = client.store.get(job_id).id

    def __repr__(self) -> str:
        return f"JobHandle({self.id[:8]}, {self.status()})"

    def record(self) -> JobRecord:
        """The job's record as the store has it now."""
        return self._client.store.get(self.id)

    def status(self) -> JobState:
        """The job's state now (``JobState.QUEUED``, ``RUNNING``, ``SUCCEEDED``, ...)."""
        return self.record().state

    def metrics(self, name: str | None = None) -> list[Metric]:
        """Every recorded metric, by step; only those called ``name`` when given (e.g. ``"eval_accuracy"``)."""
        return self._client.store.metrics(self.id, name)

    def adapter(self) -> AdapterRecord | None:
        """The adapter this job registered, once it has."""
        found = self._client.adapters.list(job_id=self.id)
        return found[0] if found else None

    def subspace(self) -> SubspaceRecord | None:
        """The IPT subspace an ``ipt-subspace`` job registered, once it has."""
        return next((s for s in self._client.subspaces.list() if s.job_id == self.id), None)

    def wait(self, *, timeout: float | None = None, poll_s: float = 1.0, progress: bool | None = None) -> JobRecord:
        """Block until the job is terminal, settling orphaned jobs meanwhile (see ``orchestrator.reconciler``).

        >>> job.wait(timeout=900).state                                                # doctest: +SKIP
        <JobState.SUCCEEDED: 'SUCCEEDED'>

        Args:
            timeout: seconds to wait; None waits for ever.
            poll_s: seconds between looks at the store.
            progress: show a progress bar (steps, loss, ETA); default: when stderr is a terminal.

        Returns:
            The job's terminal record.

        Raises:
            TimeoutError: the job was still live after ``timeout`` seconds.
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
        """Everything the job's processes printed (runner and Ray Train workers).

        Raises:
            RuntimeError: Ray cannot be reached and no copy of the logs was kept.
        """
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

    def cancel(self, *, timeout: float = 120) -> JobRecord:
        """Stop the job; see :meth:`Client.cancel`."""
        return self._client.cancel(self.id, timeout=timeout)


class Jobs:
    """``client.jobs``: list and look up jobs in the store."""

    def __init__(self, client: Client):
        self._client = client

    def list(
        self, *, state: Any = None, name: str | None = None, task_name: str | None = None, limit: int | None = 100
    ) -> list[JobRecord]:
        """Jobs, newest first.

        Args:
            state: a ``JobState`` (or its name), or several.
            name: the job's name.
            task_name: the job's task name (what promotion is keyed on).
            limit: at most this many; None for all.
        """
        return self._client.store.list_jobs(state=state, name=name, task_name=task_name, limit=limit)

    def get(self, job_id: str) -> JobHandle:
        """A handle to a job by id or unique prefix (any process, any client).

        Raises:
            JobNotFound: no job, or the prefix is ambiguous.
        """
        return JobHandle(self._client, job_id)


class Groups:
    """``client.groups``: the base groups resident on the cluster (see docs/groups.md)."""

    def __init__(self, client: Client):
        self._client = client

    def list(self) -> list[dict[str, Any]]:
        """Every live base group: ``name``, its key (``base_model`` fingerprint, ``task``, ``precision``,
        ``base_dropout``, ``cpus``, ``gpus``), ``members`` and ``waiting`` job ids, ``capacity``, ``idle_s``,
        ``steps``, ``base_mb``, ``node``."""
        from orchestrator.groups import list_groups

        self._client.cluster  # noqa: B018 - connect first
        return list_groups()

    def stop(self, name: str) -> bool:
        """End a group now; its members resume from their checkpoints in a new one. False if none is live."""
        from orchestrator.groups import stop_group

        self._client.cluster  # noqa: B018
        return stop_group(name)


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
        secrets: how launched processes get secrets (a store URL with a password, the API key): ``"auto"``
            (default, or ``$PEFTFLEET_SECRETS``): a 0600 file on this machine for a local cluster, refused for
            a remote one; ``"cluster"``: the cluster's pods already hold them (Kubernetes Secrets).
        tracking: where jobs and sweeps whose spec names no ``tracking`` log their params, metrics and adapter
            (a mapping like a spec's ``tracking:``, e.g. ``{"mlflow": {"uri": "http://mlflow:5000"}}``; see
            docs/tracking.md). Default: none.
    """

    def __init__(
        self, *, address: str | None = None, store_url: str | None = None, storage_url: str | None = None,
        home: str | os.PathLike | None = None, num_cpus: int | None = None, heartbeat_timeout_s: float = 120,
        resubmit_orphans: int | None = None, secrets: str | None = None, tracking: TrackingSpec | dict | None = None,
    ):
        self.tracking = parse_tracking(tracking)  # JobSpecError naming `tracking.<field>`
        self.secrets = secrets or os.environ.get("PEFTFLEET_SECRETS") or "auto"
        if self.secrets not in SECRETS_MODES:
            raise ValueError(f"secrets must be one of {list(SECRETS_MODES)}, not {self.secrets!r}")
        self.home = Path(peftfleet_home(home))
        self.store = JobStore(store_url, storage_url=storage_url, home=self.home)
        self.jobs = Jobs(self)
        self.sweeps = Sweeps(self)
        self.groups = Groups(self)
        self.adapters: AdapterRegistry = self.store.adapters
        self.subspaces: SubspaceRegistry = self.store.subspaces
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.resubmit_orphans = (
            int(os.environ.get("PEFTFLEET_RESUBMIT_ORPHANS", "0")) if resubmit_orphans is None else resubmit_orphans
        )
        self._address, self._num_cpus, self._cluster = address, num_cpus, None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = connect(self._address, num_cpus=self._num_cpus, **quiet.ray_init_options())
            quiet.sweep()  # Ray's loggers, when a quiet command runs (orchestrator.quiet)
            try:
                self.reconciler()
            except Exception as e:  # noqa: BLE001 - the client works without it; waiting clients settle too
                print(f"peftfleet: the standing reconciler did not start: {redact(str(e))}", file=sys.stderr)
        return self._cluster

    def reconciler(self):
        """The cluster's standing reconciler (``orchestrator.reconciler_actor``), started if it is not
        running; None when ``PEFTFLEET_RECONCILER=0``."""
        from orchestrator.reconciler_actor import ensure_reconciler
        from orchestrator.train_worker import checkpoint_root

        return ensure_reconciler(self.cluster, self.store.url, self.process_env(),
                                 checkpoint_root=checkpoint_root(self.store))

    def submit(self, spec: JobSpec | dict | str | os.PathLike, *, idempotency_key: str | None = None) -> JobHandle:  # type: ignore[valid-type]
        """Validate, store and schedule a job; returns at once.

        >>> job = client.submit("examples/trec-lora.yaml", idempotency_key="trec-lora-2026-12")  # doctest: +SKIP

        Args:
            spec: a ``JobSpec``, a mapping, or the path of a YAML/JSON spec file.
            idempotency_key: a resubmission with the same key returns the first job instead of a new one.

        Returns:
            A handle to the job (PENDING, handed to Ray as a Ray job running ``orchestrator.runner``).

        Raises:
            JobSpecError: the spec is invalid (each error names its field); nothing is stored.
            InfeasibleJob: the cluster can never give the job its resources; nothing is stored.
            IdempotencyConflict: the key was used for another spec.
        """
        spec = load_job_spec(spec) if isinstance(spec, (str, os.PathLike)) else parse_job_spec(spec)
        spec = self.with_tracking(spec)
        check_references(self.store, spec)
        check_feasible(self.cluster, spec)
        job = self.store.submit(spec, idempotency_key=idempotency_key)
        submission_id = f"peftfleet-{job.id}"
        # One launch per job: of two submits with one key (or a submit racing a cancel) only the caller
        # that records the submission id while the job is PENDING launches it.
        if self.store.claim_launch(job.id, submission_id, dashboard_url=self.cluster.dashboard_url):
            hand_to_ray(self.store, self.cluster, job.id, submission_id, self.process_env(),
                        "could not hand the job to Ray")
        return JobHandle(self, job.id)

    def with_tracking(self, spec: Any) -> Any:
        """``spec`` tracked where this client tracks by default, unless it names its own ``tracking``."""
        if self.tracking is None or getattr(spec, "kind", None) != "train" or spec.tracking is not None:
            return spec
        return spec.model_copy(update={"tracking": self.tracking})

    def process_env(self) -> dict[str, str]:
        """Where a process this client launches finds the store, the artifacts and the home folder. A store
        URL with a password is not in it: only how to find it (:meth:`secret_env`)."""
        env = {"PEFTFLEET_STORAGE_URL": self.store.artifacts.url, "PEFTFLEET_HOME": str(self.home)}
        if has_password(self.store.url):
            return {**env, **self.secret_env({"PEFTFLEET_STORE_URL": self.store.url})}
        return {**env, "PEFTFLEET_STORE_URL": self.store.url}

    def secret_env(self, values: dict[str, str]) -> dict[str, str]:
        """What a launched process needs to find the secrets ``values`` itself (see ``cluster.secret_env``)."""
        return secret_env(values, home=self.home, secrets=self.secrets, cluster=self.cluster)

    # -- sweeps ----------------------------------------------------------------------------
    def tune(
        self,
        spec: JobSpec | dict | str | os.PathLike,
        *,
        search_space: dict[str, Any],
        metric: str = "eval_accuracy",  # type: ignore[valid-type]
        mode: str = "max",
        num_samples: int | None = None,
        scheduler: str = "asha",
        max_concurrent: int | None = None,
        name: str | None = None,
        seed: int = 0,
        promote: bool = False,
        scheduler_options: dict[str, float] | None = None,
    ) -> SweepHandle:
        """Search hyper-parameters around the job ``spec`` with Ray Tune; every trial is a job in the store.

        >>> space = {"training.lr": {"loguniform": [1e-4, 1e-2]}, "method.r": {"choice": [4, 8, 16]}}
        >>> sweep = client.tune("examples/trec-lora.yaml", search_space=space)  # doctest: +SKIP

        Args:
            spec: the job every trial starts from (as for :meth:`submit`).
            search_space: dotted spec paths -> distributions (``choice``, ``uniform``, ``loguniform``,
                ``randint``, ``grid``; see ``jobs.sweep_spec``).
            metric, mode: what the best trial maximises (``"max"``) or minimises (``"min"``).
            num_samples: configurations drawn (default 8; with ``grid`` axes, how many times the whole grid runs,
                default 1).
            scheduler: ``"asha"``, ``"pbt"`` or ``"fifo"``; ``scheduler_options`` tune it.
            max_concurrent: trials running at once (default: as many as the cluster fits).
            name, seed: the sweep's name and the seed of its draws.
            promote: promote the best trial's adapter for its task when the sweep ends.

        Returns:
            A handle to the sweep, started as a Ray job running ``orchestrator.tune.driver``.

        Raises:
            JobSpecError: an invalid space or any invalid trial spec; nothing is stored.
            InfeasibleJob: the largest trial can never run here; nothing is stored.
        """
        job_spec = load_job_spec(spec) if isinstance(spec, (str, os.PathLike)) else parse_job_spec(spec)
        return self.submit_sweep(
            {
                "name": name or f"{job_spec.name}-sweep",
                "spec": job_spec.model_dump(mode="json"),
                "search_space": search_space,
                "metric": metric,
                "mode": mode,
                "num_samples": num_samples,
                "scheduler": scheduler,
                "max_concurrent": max_concurrent,
                "seed": seed,
                "promote": promote,
                "scheduler_options": scheduler_options or {},
            }
        )

    def submit_sweep(self, sweep: dict | str | os.PathLike) -> SweepHandle:
        """Validate, store and start a sweep given as a mapping or a sweep YAML file; see :meth:`tune`.

        Raises:
            JobSpecError, InfeasibleJob: as :meth:`tune`; nothing is stored.
        """
        return start_sweep(self, sweep, tracking=self.tracking)

    def cancel(self, job_id: str, *, timeout: float = 120) -> JobRecord:
        """Stop a job: its Ray job (runner and workers) is stopped and its resources freed; then it is CANCELLED.

        Args:
            job_id: the job's id or a unique prefix.
            timeout: seconds to wait for Ray to report the Ray job stopped.

        Returns:
            The job's record (already terminal jobs are returned unchanged).

        Raises:
            TimeoutError: Ray did not stop the job within ``timeout``; it stays CANCELLING.
            JobNotFound: no such job.
        """
        job = self.store.get(job_id)
        if job.state.is_terminal:
            return job
        submission = job.runtime.get("ray_submission_id")
        if job.state is JobState.PENDING:  # no runner has claimed it: one that starts later finds it settled
            try:
                job = self.store.transition(job.id, JobState.CANCELLED, expected=[JobState.PENDING],
                                            reason="cancelled before its runner claimed it")
            except IllegalTransition:
                job = self.store.get(job.id)  # claimed meanwhile: stop its runner below
            if job.state.is_terminal:
                if submission and self.ray_connected():
                    try:  # its runner, launched or about to be, would exit at once anyway
                        self.cluster.jobs_client().stop_job(submission)
                    except Exception:  # noqa: BLE001 - not launched yet, or already gone
                        pass
                return job
        if job.state is not JobState.CANCELLING and JobState.CANCELLING in ALLOWED[job.state]:
            job = self.store.transition(job.id, JobState.CANCELLING, reason="cancel requested")
        if submission and not stop_and_wait(self.cluster, submission, timeout=timeout):
            raise TimeoutError(f"Ray job {submission} did not stop within {timeout} s")
        job = self.store.get(job.id)
        if not job.state.is_terminal:  # the runner was killed before it could settle the job itself
            job = self.store.transition(job.id, JobState.CANCELLED, reason="Ray job stopped")
        return job

    def serve(
        self,
        base: str,
        *,
        adapters: list[str] | str = "all",
        task: str | None = None,
        capacity: int = 32,
        num_replicas: int = 1,
        autoscaling: dict[str, Any] | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        name: str = "peftfleet",
        route_prefix: str = "/",
        max_batch_size: int = 32,
        batch_wait_s: float = 0.01,
        scheduler: str = "continuous",
        max_prefill_tokens: int = 4096,
        cpus_per_replica: float = 1,
        gpus_per_replica: float = 0,
        device: str = "auto",
        dtype: str = "auto",
        insecure: bool = False,
        grace_s: float = 30.0,
        max_body_bytes: int | None = None,
        max_prompt_tokens: int | None = None,
        max_tokens_limit: int | None = None,
        request_timeout_s: float | None = None,
        max_classify_inputs: int | None = None,
    ) -> Serving:
        """Serve adapters from one copy of ``base`` per replica, over an OpenAI-shaped HTTP API.

        >>> serving = client.serve("minilm", adapters=["trec-lora-106e4278"])                   # doctest: +SKIP

        Args:
            base: the base model (a named model or a folder), as jobs name it.
            adapters: adapter names, or ``"all"`` registered for ``base`` (now and later).
            task: ``"causal-lm"`` or ``"sequence-classification"``; default by the base's architecture.
            capacity: adapters a replica keeps loaded (least recently used evicted first).
            num_replicas, autoscaling: a fixed count, or Ray Serve's autoscaling_config.
            api_key: the bearer key requests must carry.
            host, port, name, route_prefix: where and under what name Serve exposes it.
            max_batch_size, batch_wait_s: the most rows a replica decodes together, and how long an idle
                replica gathers the first requests before it starts.
            scheduler: ``"continuous"`` (requests join the running batch at every step) or ``"static"``
                (a new batch only once the running one is empty: the load benchmark's baseline).
            max_prefill_tokens: prompt tokens that may join the running batch in one step.
            cpus_per_replica, gpus_per_replica: each replica's resources.
            device, dtype: where each replica puts the base and its adapters (``auto``, ``cpu``, ``cuda``,
                ``cuda:N``) and in what precision (``auto``, ``fp32``, ``bf16``, ``fp16``); ``auto`` is CUDA in
                bf16 when the replica reserved a GPU, else the CPU in fp32 (``orchestrator.serving.device``).
            insecure: allow a ``host`` beyond loopback without an ``api_key``.
            grace_s: when the application is stopped, how long replicas finish the requests in flight.
            max_body_bytes, max_prompt_tokens, max_tokens_limit, request_timeout_s, max_classify_inputs: the
                limits each request is held to; None keeps ``ServeOptions``' default (docs/serving.md#limits).

        Returns:
            The running application; ``serving.url`` is the OpenAI base URL without ``/v1``.

        Raises:
            AdapterNotFound: an adapter named is not registered.
            ValueError: an adapter was trained on another base or for another task, ``device`` asks
                for a GPU the replicas do not reserve, a limit is not positive, or ``host`` is beyond
                loopback with neither ``api_key`` nor ``insecure``.
        """
        from orchestrator.serving.deployment import ServeOptions, check_binding, start

        quiet.sweep()  # Ray Serve's loggers exist now
        check_binding(host, api_key, insecure)
        limits = {k: v for k, v in {"max_body_bytes": max_body_bytes, "max_prompt_tokens": max_prompt_tokens,
                                    "max_tokens_limit": max_tokens_limit, "request_timeout_s": request_timeout_s,
                                    "max_classify_inputs": max_classify_inputs}.items() if v is not None}
        base_record = self.store.register_base_model(base)
        task = task or default_task(base_record.path)
        names = None if adapters == "all" else list(adapters)
        for adapter in names or []:
            record = self.adapters.get(adapter)  # AdapterNotFound names it
            if record.base_fingerprint != base_record.fingerprint:
                raise ValueError(f"adapter {adapter!r} was trained on another base than {base!r}")
            if record.task != task:
                raise ValueError(f"adapter {adapter!r} is a {record.task} adapter; this server serves {task}")
        options = ServeOptions(base=base, task=task, adapters=names, capacity=capacity, max_batch_size=max_batch_size,
                               batch_wait_s=batch_wait_s, scheduler=scheduler,
                               max_prefill_tokens=max_prefill_tokens, api_key=api_key, store_url=self.store.url,
                               storage_url=self.store.artifacts.url, home=str(self.home), device=device, dtype=dtype,
                               grace_s=grace_s, **limits)
        self.cluster  # noqa: B018 - connect (or start the local cluster) first
        env = {**JOB_ENV, "PEFTFLEET_HOME": str(self.home), "OMP_NUM_THREADS": str(max(1, int(cpus_per_replica)))}
        secret = {"PEFTFLEET_API_KEY": api_key} if api_key else {}
        if has_password(self.store.url):
            secret["PEFTFLEET_STORE_URL"] = self.store.url
        if secret:  # the replicas read them from there; the deployment's options leave them out
            env.update(self.secret_env(secret))
        serving = start(
            options,
            name=name,
            host=host,
            port=port,
            route_prefix=route_prefix,
            insecure=insecure,
            num_replicas=num_replicas,
            autoscaling=autoscaling,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
            env=env,
        )
        quiet.sweep()
        print(
            f"serving {base} ({task}; adapters: {', '.join(names) if names is not None else 'all registered'}) at "
            f"{serving.url}/v1",
            flush=True,
        )
        return serving

    def settle_orphans(self) -> list[JobRecord]:
        """Settle live jobs whose owner stopped heartbeating (see ``orchestrator.reconciler``); returns them."""
        resubmit = self._resubmit if self.resubmit_orphans and self._cluster is not None else None
        return settle_orphans(self.store, timeout_s=self.heartbeat_timeout_s, cluster=self._cluster, resubmit=resubmit,
                              max_attempts=self.resubmit_orphans)

    def ray_connected(self) -> bool:
        """Whether this client talks to Ray already (or will, through ``RAY_ADDRESS``), without connecting."""
        return self._cluster is not None or bool(os.environ.get("RAY_ADDRESS"))

    def _resubmit(self, job_id: str) -> None:
        """A new owner (runner) for a job whose owner died; it resumes from its last checkpoint."""
        resubmit(self.store, self.cluster, job_id, self.process_env())


def parse_tracking(value: TrackingSpec | dict | None) -> TrackingSpec | None:
    """A client's default ``tracking`` (None stays None); a bad one raises :class:`JobSpecError` naming the
    field, as in a spec (``tracking.mlflow.uri: ...``)."""
    from pydantic import ValidationError

    if value is None or isinstance(value, TrackingSpec):
        return value
    try:
        return TrackingSpec.model_validate(value)
    except ValidationError as e:
        raise JobSpecError([(".".join(str(p) for p in ("tracking", *err["loc"])),
                             err["msg"].removeprefix("Value error, ")) for err in e.errors()]) from None


def default_task(base_folder: str | os.PathLike) -> str:
    """causal-lm for decoder-only bases (by their config's architectures), else sequence-classification."""
    import json

    config = json.loads((Path(base_folder) / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or []) or config.get("model_type") in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "olmo",
    )
    return "causal-lm" if causal else "sequence-classification"


__all__ = ["Client", "InfeasibleJob", "JobHandle", "JobSpecError"]
