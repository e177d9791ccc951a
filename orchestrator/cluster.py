"""What the client and the sweep code both need from the Ray cluster: connecting to it, launching a
peftfleet process as a Ray job, and stopping one (whether a job can ever get its resources is
:mod:`orchestrator.feasibility`).

>>> cluster = connect()                                   # local Ray, or RAY_ADDRESS   # doctest: +SKIP
>>> check_feasible(cluster, spec)                        # InfeasibleJob if never      # doctest: +SKIP
>>> launch(cluster, "orchestrator.runner JOB_ID", submission_id="peftfleet-JOB_ID",
...        resources=spec.resources, env=client.process_env())                       # doctest: +SKIP
>>> stop_and_wait(cluster, "peftfleet-JOB_ID", timeout=120)                            # doctest: +SKIP

No secret travels in a runtime env: :func:`secret_env` hands a launched process the path of a 0600
file (a cluster on this machine) or relies on the cluster's own environment (``secrets="cluster"``),
and :func:`launch` refuses an env that holds a password or a secret's name (docs/security.md).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from jobs.secrets import FILE_ENV, MODE_ENV, SECRET_NAMES, has_password, write_secrets_file
from orchestrator.feasibility import NodeShape, read_node_shapes

# Environment every job process gets: offline models, DeepSpeed's CPU accelerator unless GPUs are
# used, and a Ray Train worker-group start timeout long enough to wait in the queue for resources.
JOB_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600),
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# Settings a launched process inherits from the caller when the caller has them.
PASSTHROUGH_ENV = (
    "PEFTFLEET_HEARTBEAT_INTERVAL_S",
    "PEFTFLEET_MAX_FAILURES",
    "PEFTFLEET_CHECKPOINT_URL",
    "PEFTFLEET_GROUP_IDLE_S",
    "PEFTFLEET_GROUP_MAX_MEMBERS",
    "RAY_AUTH_MODE",
    FILE_ENV,  # where this process's secrets are (a file on this machine), or
    MODE_ENV,  # that the cluster's pods hold them
)
SECRETS_MODES = ("auto", "cluster")
RAY_TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})  # a Ray job in one of these runs nothing any more
RAY_LIVE = frozenset({"PENDING", "RUNNING"})

@dataclass(frozen=True)
class Cluster:
    dashboard_url: str
    started_here: bool
    address: str | None = None

    def jobs_client(self):
        from ray.job_submission import JobSubmissionClient

        url = self.dashboard_url if "://" in self.dashboard_url else f"http://{self.dashboard_url}"
        return JobSubmissionClient(url)

    def node_shapes(self) -> list[NodeShape] | None:
        """The shapes of the nodes this cluster has or can grow to (see ``feasibility.read_node_shapes``)."""
        return read_node_shapes()

    def ray_job_status(self, submission_id: str) -> str | None:
        """The Ray job's status (``PENDING``, ``RUNNING``, ``STOPPED``, ...), or None when Ray does not know it."""
        try:
            return str(self.jobs_client().get_job_status(submission_id))
        except Exception:  # noqa: BLE001 - unknown to this cluster
            return None


def connect(
    address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
    log_to_driver: bool = True,
) -> Cluster:
    """Attach to ``address`` (or ``RAY_ADDRESS``), reuse this process's Ray, or start a local cluster.

    A cluster started here lives as long as this Python process; for jobs that outlive it, run
    ``ray start --head`` once and connect with ``address="auto"``. ``log_to_driver=False`` keeps what
    workers and actors print in Ray's logs instead of this process's terminal (``orchestrator.quiet``).
    """
    if ray.is_initialized():
        return Cluster(_dashboard_url(), started_here=False, address=address)
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {} if log_to_driver else {"log_to_driver": False}  # Ray's own default otherwise (ray:// passes it on)
    if address:
        ctx = ray.init(address=address, logging_level="WARNING", **quiet)
        return Cluster(ctx.dashboard_url or _dashboard_url(), started_here=False, address=address)
    ctx = ray.init(
        num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
        object_store_memory=object_store_memory, logging_level="WARNING", **quiet,
    )
    return Cluster(ctx.dashboard_url, started_here=True)


def is_local(cluster: Cluster) -> bool:
    """Whether the cluster runs on this machine (started here, or found by ``auto`` / this process's Ray)."""
    return cluster.started_here or cluster.address in (None, "auto")


_written: dict[tuple, Path] = {}  # secrets files this process wrote, by (home, values): one per set of secrets


def secret_env(values: dict[str, str], *, home: str | os.PathLike, secrets: str, cluster: Cluster) -> dict[str, str]:
    """What a process launched on ``cluster`` needs to find the secrets ``values`` itself, never the values:
    ``PEFTFLEET_SECRETS=cluster`` when the cluster's pods hold them (``secrets="cluster"``), else, for a
    cluster on this machine, the path of a 0600 file under ``home/secrets`` (written once per set).

    Raises:
        ValueError: the cluster is remote and ``secrets`` is not ``"cluster"``.
    """
    if secrets not in SECRETS_MODES:
        raise ValueError(f"secrets must be one of {list(SECRETS_MODES)}, not {secrets!r}")
    if secrets == "cluster":
        return {MODE_ENV: "cluster"}
    if not is_local(cluster):
        raise ValueError(
            f"refusing to send {', '.join(sorted(values))} to the remote Ray cluster {cluster.address}: a secret never "
            "travels in a runtime env. Give the cluster's pods these from a Kubernetes Secret and pass "
            "secrets='cluster' (PEFTFLEET_SECRETS=cluster); see docs/security.md"
        )
    key = (str(home), tuple(sorted(values.items())))
    if key not in _written or not _written[key].exists():
        _written[key] = write_secrets_file(home, values)
    return {FILE_ENV: str(_written[key])}


def check_no_secrets(env: dict[str, str]) -> None:
    """Refuse a runtime env that holds a secret: an API key, or any value with a password in it (a store
    URL without one, e.g. SQLite's, may travel)."""
    leaked = sorted(k for k, v in env.items() if (k in SECRET_NAMES and k != "PEFTFLEET_STORE_URL") or has_password(v))
    if leaked:
        raise ValueError(f"refusing to put {', '.join(leaked)} in a Ray runtime env: it holds a secret "
                         "(see orchestrator.cluster.secret_env)")


def launch(cluster: Cluster, module_args: str, *, submission_id: str, resources: Any, env: dict[str, str],
           metadata: dict[str, str] | None = None) -> None:
    """Start ``python -m <module_args>`` as a Ray job with peftfleet's environment plus ``env``; refused
    when that holds a secret (:func:`check_no_secrets`)."""
    full_env = {**JOB_ENV, **env, "PEFTFLEET_SUBMISSION_ID": submission_id,
                **worker_env(resources.cpus_per_worker, resources.gpus_per_worker)}
    check_no_secrets(full_env)
    python = os.environ.get("PEFTFLEET_RUNNER_PYTHON") or (sys.executable if is_local(cluster) else "python")
    cluster.jobs_client().submit_job(
        entrypoint=f"{python} -m {module_args}", submission_id=submission_id, runtime_env={"env_vars": full_env},
        entrypoint_num_cpus=0, metadata=metadata or {},
    )


def worker_env(cpus: float, gpus: float) -> dict[str, str]:
    """What a peftfleet process holding ``cpus`` CPUs and ``gpus`` GPUs gets on top of ``JOB_ENV``:
    DeepSpeed's accelerator, its thread count, and the settings passed on from this process."""
    return {
        "DS_ACCELERATOR": "cuda" if gpus else "cpu",
        "OMP_NUM_THREADS": str(max(1, round(cpus))),  # 1.9 CPUs: 2 threads (0.1 left for light processes)
        **{k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ},
    }


def stop_and_wait(cluster: Cluster, submission_id: str, *, timeout: float = 120, poll_s: float = 0.5) -> bool:
    """Stop a Ray job and wait until Ray reports it ended; False if it had not ended by ``timeout``."""
    jobs_client = cluster.jobs_client()
    jobs_client.stop_job(submission_id)
    deadline = time.monotonic() + timeout
    while str(jobs_client.get_job_status(submission_id)) not in RAY_TERMINAL:
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _dashboard_url() -> str:
    url = ray._private.worker.get_dashboard_url()
    if not url:
        raise RuntimeError(
            "this Ray cluster has no dashboard; peftfleet submits jobs through it (start Ray with "
            "include_dashboard=True)"
        )
    return url
