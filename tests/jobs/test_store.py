"""The store itself: submission, lookup, idempotency, metrics, heartbeats, schema versions."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text

from jobs.spec import JobSpecError
from jobs.states import JobState
from jobs.store import IdempotencyConflict, JobNotFound, JobStore, StoreError, StoreVersionError
from jobs.store.db import Database
from jobs.store.schema import SCHEMA_VERSION
from tests.jobs.conftest import minilm_spec


def test_submit_stores_a_pending_job_with_its_spec_and_first_event(store):
    job = store.submit(minilm_spec(tags=["a"]))
    assert job.state is JobState.PENDING and job.method == "lora" and job.task_name == "trec"
    assert store.get(job.id) == job
    assert job.job_spec.method.r == 8
    [event] = store.events(job.id)
    assert (event.from_state, event.to_state, event.reason) == (None, JobState.PENDING, "submitted")


def test_an_invalid_spec_is_refused_before_anything_is_stored(store):
    with pytest.raises(JobSpecError, match="method.r"):
        store.submit(minilm_spec(method={"method": "lora", "r": 0}))
    assert store.count_jobs() == 0


def test_idempotency_key_returns_the_first_job_and_refuses_a_different_spec(store):
    first = store.submit(minilm_spec(), idempotency_key="nightly-2026-11-28")
    again = store.submit(minilm_spec(), idempotency_key="nightly-2026-11-28")
    assert again.id == first.id and store.count_jobs() == 1
    with pytest.raises(IdempotencyConflict, match="already used for job"):
        store.submit(minilm_spec(name="other"), idempotency_key="nightly-2026-11-28")
    assert store.submit(minilm_spec(idempotency_key="in-spec")).idempotency_key == "in-spec"
    assert store.count_jobs() == 2


def test_lookup_by_unique_prefix_and_clear_errors(store):
    job = store.submit(minilm_spec())
    assert store.get(job.id[:8]).id == job.id
    with pytest.raises(JobNotFound, match="no job 'ffffffffffff'"):
        store.get("ffffffffffff")


def test_list_filters_and_orders_newest_first(store):
    a = store.submit(minilm_spec(name="a"))
    b = store.submit(minilm_spec(name="b"))
    store.transition(b.id, JobState.QUEUED)
    assert [j.id for j in store.list_jobs()] == [b.id, a.id]
    assert [j.id for j in store.list_jobs(state=JobState.QUEUED)] == [b.id]
    assert [j.id for j in store.list_jobs(state=["PENDING", "QUEUED"], name="a")] == [a.id]
    assert store.list_jobs(task_name="nope") == []


def test_metrics_are_kept_per_step_and_name(store):
    job = store.submit(minilm_spec())
    store.record_metrics(job.id, 10, {"loss": 0.9, "lr": 1e-3})
    store.record_metrics(job.id, 20, {"loss": 0.5})
    assert [(m.step, m.value) for m in store.metrics(job.id, "loss")] == [(10, 0.9), (20, 0.5)]
    assert len(store.metrics(job.id)) == 3
    with pytest.raises(JobNotFound):
        store.record_metrics("0" * 32, 1, {"loss": 1.0})


def test_heartbeat_only_counts_while_the_job_is_live(store):
    job = store.submit(minilm_spec())
    store.claim(job.id, "driver-1", reason="test")
    store.transition(job.id, JobState.RUNNING)
    assert store.heartbeat(job.id, "driver-1") and store.get(job.id).heartbeat_at is not None
    store.transition(job.id, JobState.SUCCEEDED)
    assert not store.heartbeat(job.id, "driver-1")


def test_a_store_written_by_a_newer_version_is_refused(store_url, tmp_path):
    store = JobStore(store_url, home=tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    with store.db.engine.begin() as conn:
        conn.execute(text("UPDATE peftfleet_schema SET version = 99"))
    store.close()
    with pytest.raises(StoreVersionError, match="schema version 99, written by a newer peftfleet"):
        JobStore(store_url, home=tmp_path)


def test_an_older_store_is_refused_until_upgraded_explicitly_then_keeps_its_jobs(store_url, tmp_path):
    store = JobStore(store_url, home=tmp_path)
    job = store.submit(minilm_spec())
    with store.db.engine.begin() as conn:  # what peftfleet 1 left: no subspaces table
        conn.execute(text("DROP TABLE subspaces"))
        conn.execute(text("UPDATE peftfleet_schema SET version = 1"))
    store.close()
    with pytest.raises(StoreVersionError, match="schema version 1; .* run `peftfleet db upgrade`"):
        JobStore(store_url, home=tmp_path)
    with JobStore(store_url, home=tmp_path, auto_upgrade=True).db.engine.connect():
        pass  # opting in migrates on open
    migrated = JobStore(store_url, home=tmp_path)
    assert migrated.schema_version() == SCHEMA_VERSION
    assert migrated.get(job.id).name == job.name
    assert migrated.subspaces.list() == []


def test_db_upgrade_migrates_and_says_from_what(store_url, tmp_path):
    store = JobStore(store_url, home=tmp_path)
    with store.db.engine.begin() as conn:
        conn.execute(text("DROP TABLE checkpoints"))
        conn.execute(text("ALTER TABLE job_events DROP COLUMN owner"))
        conn.execute(text("UPDATE peftfleet_schema SET version = 3"))
    store.close()
    assert Database(store_url, check=False).upgrade() == (3, SCHEMA_VERSION)
    assert Database(store_url).upgrade() == (SCHEMA_VERSION, SCHEMA_VERSION)  # nothing left to do
    upgraded = JobStore(store_url, home=tmp_path)
    assert upgraded.checkpoints.list("x") == []
    job = upgraded.submit(minilm_spec())
    upgraded.claim(job.id, "runner-1", reason="test")
    assert [e.owner for e in upgraded.events(job.id)] == [None, "runner-1"]


def test_a_version_4_store_is_carried_forward_and_its_bases_get_a_source_when_registered_again(store_url, tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()  # all a base's registration reads: a config and safetensors weights
    (tmp_path / "base" / "config.json").write_text('{"model_type": "bert"}')
    save_file({"w": torch.ones(2)}, tmp_path / "base" / "model.safetensors")
    store = JobStore(store_url, home=tmp_path)
    base = store.register_base_model(str(tmp_path / "base"))
    with store.db.engine.begin() as conn:  # what peftfleet 4 left: base models without a source
        conn.execute(text("ALTER TABLE base_models DROP COLUMN source"))
        conn.execute(text("UPDATE peftfleet_schema SET version = 4"))
    store.close()
    with pytest.raises(StoreVersionError, match="schema version 4; .* run `peftfleet db upgrade`"):
        JobStore(store_url, home=tmp_path)
    assert Database(store_url, check=False).upgrade() == (4, SCHEMA_VERSION)
    upgraded = JobStore(store_url, home=tmp_path)
    kept = upgraded.get_base_model(base.fingerprint)
    assert (kept.name, kept.path, kept.source) == (base.name, base.path, None)
    assert upgraded.register_base_model(str(tmp_path / "base")).source == base.source
    assert upgraded.get_base_model(base.fingerprint).source["kind"] == "local"


def test_a_store_without_a_version_is_damaged_not_newer(store_url, tmp_path):
    store = JobStore(store_url, home=tmp_path)
    with store.db.engine.begin() as conn:
        conn.execute(text("DELETE FROM peftfleet_schema"))
    store.close()
    with pytest.raises(StoreVersionError, match="records no schema version .* damaged"):
        JobStore(store_url, home=tmp_path)


def test_a_corrupt_or_foreign_database_is_a_one_line_error(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite file at all" * 200)
    with pytest.raises(StoreError) as caught:
        JobStore(f"sqlite:///{corrupt}", home=tmp_path)
    assert "cannot open the store" in str(caught.value) and "\n" not in str(caught.value)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="has tables but is not a peftfleet store"):
        JobStore(f"sqlite:///{foreign}", home=tmp_path)


def test_default_store_is_sqlite_in_wal_mode_under_peftfleet_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTFLEET_HOME", str(tmp_path / "ph"))
    monkeypatch.delenv("PEFTFLEET_STORE_URL", raising=False)
    store = JobStore()
    assert store.url == f"sqlite:///{tmp_path / 'ph' / 'peftfleet.db'}"
    with store.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert store.artifacts.root == str(tmp_path / "ph" / "artifacts")


def test_a_base_whose_folder_is_gone_is_found_where_its_weights_are_now(store, tmp_path):
    import shutil

    from jobs.base_models import resolve_base_model

    old = shutil.copytree(resolve_base_model("minilm"), tmp_path / "old-venv" / "model")
    first = store.register_base_model(str(old))
    shutil.rmtree(old)  # e.g. the virtual environment that held a packaged model was recreated elsewhere
    again = store.register_base_model("minilm")
    assert again.fingerprint == first.fingerprint and again.name == first.name
    assert again.path == str(resolve_base_model("minilm")) and again.source == first.source


def test_base_models_are_registered_once_by_fingerprint(store):
    first = store.register_base_model("minilm")
    assert first.fingerprint.startswith("sha256:") and first.model_type == "bert"
    assert store.register_base_model("minilm") == first
    assert store.get_base_model("minilm") == first
    assert store.list_base_models() == [first]
