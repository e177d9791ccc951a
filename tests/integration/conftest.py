"""A real local Ray cluster (with the dashboard, which Ray Jobs needs) shared by the integration tests."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PEFTFLEET_HEARTBEAT_INTERVAL_S", "1")
os.environ.setdefault("PEFTFLEET_GROUP_IDLE_S", "3")  # a test's base group gives its CPU back soon after
os.environ.setdefault("PEFTFLEET_RECONCILER", "0")  # one per store: each test's own store would start one
# A Hugging Face cache of the session's own, set before Ray starts so every worker reads the same one
# (tests/integration/test_newcomer.py files a packaged model in it under a Hub id)
os.environ.setdefault("HF_HUB_CACHE", tempfile.mkdtemp(prefix="peftfleet-test-hub-"))

import pytest
import ray

from orchestrator import Client
from tests.conftest import save_tiny_bert

CLUSTER_CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=256 * 2**20, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def client(ray_cluster, tmp_path):
    c = Client(home=tmp_path / "home")
    yield c
    for job in c.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        c.cancel(job.id)  # never leave work behind for the next test
    for group in c.groups.list():
        c.groups.stop(group["name"])


@pytest.fixture
def tiny_spec(tiny_bert_dir):
    def make(**overrides) -> dict:
        spec = {
            "name": "tiny", "base_model": str(tiny_bert_dir), "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 256},
            "method": {"method": "lora", "r": 4},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 128, "max_length": 32},
            "resources": {"num_workers": 1},
            "packing": "off",  # these tests guard the solo path; tests/integration/test_groups.py packs
        }
        for key, value in overrides.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        return spec

    return make
