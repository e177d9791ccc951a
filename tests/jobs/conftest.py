"""Store fixtures: every store test runs on SQLite and, when a server is reachable, PostgreSQL."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine

from jobs.store import JobStore

POSTGRES_URL = os.environ.get("PEFTFLEET_TEST_POSTGRES_URL")


def minilm_spec(**overrides) -> dict:
    spec = {
        "name": "trec-lora", "base_model": "minilm", "task": "sequence-classification",
        "dataset": {"name": "trec"}, "method": {"method": "lora", "r": 8},
    }
    spec.update(overrides)
    return spec


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    if not POSTGRES_URL:
        pytest.skip("PEFTFLEET_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against (.ci/run starts one)")
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:  # each test starts from an empty database
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def store(store_url, tmp_path):
    s = JobStore(store_url, home=tmp_path / "home", storage_url=tmp_path / "artifacts")
    yield s
    s.close()
