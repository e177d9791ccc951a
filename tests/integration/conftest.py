"""A real local Ray cluster (with the dashboard, which Ray Jobs needs) shared by the integration tests."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PEFTFLEET_HEARTBEAT_INTERVAL_S", "1")

import pytest
import ray
import torch
import transformers

from jobs.base_models import resolve_base_model
from orchestrator import Client

CLUSTER_CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=256 * 2**20, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT without dropout (so data-parallel runs can match exactly) and MiniLM's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm")).save_pretrained(folder)
    return folder


@pytest.fixture
def client(ray_cluster, tmp_path):
    c = Client(home=tmp_path / "home")
    yield c
    for job in c.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        c.cancel(job.id)  # never leave work behind for the next test


@pytest.fixture
def tiny_spec(tiny_bert_dir):
    def make(**overrides) -> dict:
        spec = {
            "name": "tiny", "base_model": str(tiny_bert_dir), "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 256},
            "method": {"method": "lora", "r": 4},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 128, "max_length": 32},
            "resources": {"num_workers": 1},
        }
        for key, value in overrides.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        return spec

    return make
