"""A real multi-node Ray cluster on this machine: a head with no CPUs (it only runs drivers) and
worker nodes with their own raylets, one CPU each. Runs in its own pytest process (`make test`
runs tests/cluster after the rest), because one process holds one Ray connection.

The store is PostgreSQL when PEFTFLEET_TEST_POSTGRES_URL is set (as `.ci/run` does), else a
SQLite file; artifacts and checkpoints are a folder every node of this machine reaches."""

from __future__ import annotations

import os
import socket
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PEFTFLEET_HEARTBEAT_INTERVAL_S", "1")
os.environ.setdefault("PEFTFLEET_RECONCILER", "0")  # these tests drive settling from their clients

import pytest
import ray
from ray.cluster_utils import Cluster
from sqlalchemy import create_engine

from orchestrator import Client
from tests.conftest import save_tiny_bert

NODE_MEMORY = 150 * 2**20


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port(), "object_store_memory": NODE_MEMORY,
    })
    for _ in range(2):
        add_worker_node(c)
    c.wait_for_nodes()
    _wait_for_job_agents()
    yield c
    ray.shutdown()
    c.shutdown()


def _wait_for_job_agents(timeout: float = 120) -> None:
    """Ray accepts job submissions once the nodes' dashboard agents have registered."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(f"http://{ray._private.worker.get_dashboard_url()}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            submission = jobs.submit_job(entrypoint="python -c pass", entrypoint_num_cpus=0)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while str(jobs.get_job_status(submission)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(0.5)


def _free_port() -> int:
    """Another Ray on this machine may hold the default dashboard port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_worker_node(c: Cluster):
    """One more worker node: its own raylet and object store, one CPU, its own agent port."""
    return c.add_node(num_cpus=1, object_store_memory=NODE_MEMORY, dashboard_agent_listen_port=_free_port())


def worker_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


@pytest.fixture
def store_url(tmp_path):
    url = os.environ.get("PEFTFLEET_TEST_POSTGRES_URL")
    if not url:
        return f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture
def client(cluster, store_url, tmp_path):
    c = Client(
        store_url=store_url,
        storage_url=str(tmp_path / "shared-artifacts"),
        home=tmp_path / "home",
        heartbeat_timeout_s=8,
    )
    yield c
    for job in c.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        c.cancel(job.id)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def spec(tiny_bert_dir):
    def make(name: str, *, workers: int = 1, **training) -> dict:
        return {
            "name": name, "base_model": str(tiny_bert_dir), "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 256}, "method": {"method": "lora", "r": 4},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 64, "max_length": 32, **training},
            "resources": {"num_workers": workers, "cpus_per_worker": 1,
                          "placement_strategy": "STRICT_SPREAD" if workers > 1 else "PACK"},
            "packing": "off",  # Ray Train worker groups across nodes; base groups: tests/integration/test_groups.py
        }

    return make
