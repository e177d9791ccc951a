"""Connecting to Ray: a cluster at an address, one already running here, or a new local one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

# Environment every job process gets: offline models, DeepSpeed's CPU accelerator unless GPUs are
# used, and a Ray Train worker-group start timeout long enough to wait in the queue for resources.
JOB_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600),
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Cluster:
    dashboard_url: str
    started_here: bool

    def jobs_client(self):
        from ray.job_submission import JobSubmissionClient

        url = self.dashboard_url if "://" in self.dashboard_url else f"http://{self.dashboard_url}"
        return JobSubmissionClient(url)

    def resources(self) -> dict[str, float]:
        return ray.cluster_resources()


def connect(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None) -> Cluster:
    """Attach to ``address`` (or ``RAY_ADDRESS``), reuse this process's Ray, or start a local cluster.

    A cluster started here lives as long as this Python process; for jobs that outlive it, run
    ``ray start --head`` once and connect with ``address="auto"``.
    """
    if ray.is_initialized():
        return Cluster(_dashboard_url(), started_here=False)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address, logging_level="WARNING")
        return Cluster(ctx.dashboard_url or _dashboard_url(), started_here=False)
    ctx = ray.init(
        num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
        object_store_memory=object_store_memory, logging_level="WARNING",
    )
    return Cluster(ctx.dashboard_url, started_here=True)


def _dashboard_url() -> str:
    url = ray._private.worker.get_dashboard_url()
    if not url:
        raise RuntimeError("this Ray cluster has no dashboard; peftfleet submits jobs through it (start Ray with include_dashboard=True)")
    return url
