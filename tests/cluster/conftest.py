"""A real multi-node Ray cluster on this machine: a head with no CPUs (it only runs drivers) and
worker nodes with their own raylets, one CPU each. Runs in its own pytest process (`make test`
runs tests/cluster after the rest), because one process holds one Ray connection.

The store is PostgreSQL when PEFTFLEET_TEST_POSTGRES_URL is set (as `.ci/run` does), else a
SQLite file; artifacts and checkpoints are a folder every node of this machine reaches."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PEFTFLEET_HEARTBEAT_INTERVAL_S", "1")

import pytest
import ray
import torch
import transformers
from ray.cluster_utils import Cluster
from sqlalchemy import create_engine

from jobs.base_models import resolve_base_model
from orchestrator import Client

NODE_MEMORY = 150 * 2**20


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "object_store_memory": NODE_MEMORY,
    })
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


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
    c = Client(store_url=store_url, storage_url=str(tmp_path / "shared-artifacts"), home=tmp_path / "home", heartbeat_timeout_s=8)
    yield c
    for job in c.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        c.cancel(job.id)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm")).save_pretrained(folder)
    return folder


@pytest.fixture
def spec(tiny_bert_dir):
    def make(name: str, *, workers: int = 1, **training) -> dict:
        return {
            "name": name, "base_model": str(tiny_bert_dir), "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 256}, "method": {"method": "lora", "r": 4},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 64, "max_length": 32, **training},
            "resources": {"num_workers": workers, "cpus_per_worker": 1,
                          "placement_strategy": "STRICT_SPREAD" if workers > 1 else "PACK"},
        }

    return make
