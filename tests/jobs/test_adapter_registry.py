"""The adapter registry on a real store and real artifact storage (local folder and fsspec)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from transformers import AutoModelForSequenceClassification

import peft_methods
from jobs.store import JobStore
from jobs.store.adapter_registry import AdapterExists, AdapterNotFound, AdapterPromoted
from jobs.store.schema import AdapterTagRow, JobRow
from peft_methods import AdapterIntegrityError, BaseModelMismatch
from tests.conftest import TINY_BERT, randomize_adapter, tiny_bert
from tests.jobs.conftest import minilm_spec


def save_base(folder, seed: int):
    torch.manual_seed(seed)
    tiny_bert().save_pretrained(folder)
    return folder


@pytest.fixture
def bases(store, tmp_path):
    """Two registered tiny bases that differ only in their random weights."""
    a, b = save_base(tmp_path / "base-a", 1), save_base(tmp_path / "base-b", 2)
    return {
        "a": (a, store.register_base_model(str(a)).fingerprint),
        "b": (b, store.register_base_model(str(b)).fingerprint),
    }


def load_base(folder):
    torch.manual_seed(99)  # the head is freshly initialised; the adapter carries the trained one
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def make_adapter(tmp_path, base, method: str = "lora", seed: int = 0):
    folder, fingerprint = base
    model = peft_methods.apply(load_base(folder), {"method": method})
    randomize_adapter(model, scale=0.1 + seed)
    out = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    peft_methods.save_adapter(model, out, metadata={"base_fingerprint": fingerprint})
    return out, model


def register(store, tmp_path, base, name, *, method="lora", task_name="trec", tags=(), job_id=None, seed=0):
    folder, _ = make_adapter(tmp_path, base, method, seed)
    return store.adapters.register(
        folder,
        name=name,
        base_fingerprint=base[1],
        task="sequence-classification",
        task_name=task_name,
        tags=tags,
        job_id=job_id,
        metrics={"eval_accuracy": 0.5},
    )


def test_register_records_lineage_hashes_and_size(store, bases, tmp_path):
    job = store.submit(minilm_spec())
    folder, _ = make_adapter(tmp_path, bases["a"])
    record = store.adapters.register(
        folder,
        name="trec-lora-1",
        base_fingerprint=bases["a"][1],
        task="sequence-classification",
        task_name="trec",
        job_id=job.id,
        metrics={"eval_accuracy": 0.88},
        tags=["demo"],
    )
    manifest = json.loads((folder / "peftfleet.json").read_text())
    assert (record.job_id, record.method, record.task_name, record.tags) == (job.id, "lora", "trec", ("demo",))
    assert record.files == manifest["files"] and record.num_parameters == manifest["num_parameters"]
    assert record.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert record.metrics == {"eval_accuracy": 0.88} and not record.promoted
    assert store.adapters.get(record.id) == store.adapters.get("trec-lora-1") == record


def test_queries_by_base_task_method_tag_and_job(store, bases, tmp_path):
    job = store.submit(minilm_spec())
    register(store, tmp_path, bases["a"], "a-lora", tags=["x"], job_id=job.id)
    register(store, tmp_path, bases["a"], "a-bitfit", method="bitfit", task_name="sst", tags=["x", "y"])
    register(store, tmp_path, bases["b"], "b-lora")
    names = lambda rs: sorted(r.name for r in rs)  # noqa: E731
    assert names(store.adapters.list(base=bases["a"][1])) == ["a-bitfit", "a-lora"]
    assert names(store.adapters.list(base=str(bases["b"][0]))) == ["b-lora"]  # by the name it was registered under
    assert names(store.adapters.list(method="lora")) == ["a-lora", "b-lora"]
    assert names(store.adapters.list(task_name="sst")) == ["a-bitfit"]
    assert names(store.adapters.list(tag="x")) == ["a-bitfit", "a-lora"]
    assert names(store.adapters.list(tag="y", base=bases["a"][1])) == ["a-bitfit"]
    assert names(store.adapters.list(job_id=job.id)) == ["a-lora"]


def test_one_promoted_adapter_per_base_and_task(store, bases, tmp_path):
    register(store, tmp_path, bases["a"], "v1")
    register(store, tmp_path, bases["a"], "v2")
    register(store, tmp_path, bases["b"], "other-base")
    store.adapters.promote("v1")
    store.adapters.promote("other-base")
    assert store.adapters.promote("v2").promoted
    assert store.adapters.promoted(bases["a"][1], "trec").name == "v2"
    assert not store.adapters.get("v1").promoted
    assert store.adapters.promoted(bases["b"][1], "trec").name == "other-base"
    assert sorted(r.name for r in store.adapters.list(promoted=True)) == ["other-base", "v2"]
    store.adapters.demote("v2")
    assert store.adapters.promoted(bases["a"][1], "trec") is None


def test_delete_is_refused_while_promoted_unless_forced(store, bases, tmp_path):
    record = register(store, tmp_path, bases["a"], "keep-me")
    store.adapters.promote("keep-me")
    with pytest.raises(AdapterPromoted, match="is promoted for task 'trec'"):
        store.adapters.delete("keep-me")
    assert store.adapters.get("keep-me").promoted
    store.adapters.delete("keep-me", force=True)
    with pytest.raises(AdapterNotFound):
        store.adapters.get("keep-me")
    assert not os.path.exists(record.uri)
    assert store.adapters.promoted(bases["a"][1], "trec") is None


@pytest.mark.parametrize("bad", ["../escape", "a/b", "a\\b", "", "x" * 65, ".hidden", "a..b"])
def test_adapter_names_are_validated_before_anything_is_written(store, bases, tmp_path, bad):
    folder, _ = make_adapter(tmp_path, bases["a"])
    with pytest.raises(ValueError, match="adapter name"):
        store.adapters.register(
            folder, name=bad, base_fingerprint=bases["a"][1], task="sequence-classification", task_name="t"
        )
    assert list((tmp_path / "artifacts").glob("adapters/*")) == []


def test_a_duplicate_name_is_refused_and_leaves_no_files(store, bases, tmp_path):
    register(store, tmp_path, bases["a"], "dup")
    with pytest.raises(AdapterExists):
        register(store, tmp_path, bases["a"], "dup")
    assert len(list((tmp_path / "artifacts").glob("adapters/*"))) == 1


def test_load_reproduces_outputs_and_refuses_another_base(store, bases, tmp_path):
    folder, trained = make_adapter(tmp_path, bases["a"])
    store.adapters.register(
        folder, name="a-adapter", base_fingerprint=bases["a"][1], task="sequence-classification", task_name="t"
    )
    batch = {k: v for k, v in TINY_BERT.batch().items() if k != "labels"}
    with torch.no_grad():
        expected = trained(**batch).logits
        loaded = store.adapters.load("a-adapter", load_base(bases["a"][0]))
        assert torch.equal(loaded(**batch).logits, expected)
    with pytest.raises(BaseModelMismatch) as err:
        store.adapters.load("a-adapter", load_base(bases["b"][0]))
    assert bases["a"][1] in str(err.value) and bases["b"][1] in str(err.value)


def test_registering_against_the_wrong_base_is_refused(store, bases, tmp_path):
    folder, _ = make_adapter(tmp_path, bases["a"])
    with pytest.raises(BaseModelMismatch, match="records base"):
        store.adapters.register(
            folder, name="liar", base_fingerprint=bases["b"][1], task="sequence-classification", task_name="t"
        )


def test_a_tampered_artifact_is_refused_on_load(store, bases, tmp_path):
    record = register(store, tmp_path, bases["a"], "tampered")
    weights = f"{record.uri}/adapter_model.safetensors"
    tensors = load_file(weights)
    tensors = {k: v * 2 for k, v in tensors.items()}
    save_file(tensors, weights)
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        store.adapters.load("tampered", load_base(bases["a"][0]))


def test_fsspec_storage_uploads_manifest_last_and_downloads_verified(bases, tmp_path, store_url):
    storage = f"memory://peftfleet-{uuid.uuid4().hex[:8]}"
    store = JobStore(store_url, home=tmp_path / "home2", storage_url=storage)
    store.register_base_model(str(bases["a"][0]))
    folder, trained = make_adapter(tmp_path, bases["a"])
    record = store.adapters.register(
        folder, name="remote", base_fingerprint=bases["a"][1], task="sequence-classification", task_name="t"
    )
    assert record.uri.startswith("memory://")
    local = store.adapters.local_folder("remote")
    assert local.is_relative_to(tmp_path / "home2")
    batch = {k: v for k, v in TINY_BERT.batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(
            store.adapters.load("remote", load_base(bases["a"][0]))(**batch).logits, trained(**batch).logits
        )

    store.artifacts.fs.rm(store.artifacts.fs._strip_protocol(record.uri) + "/peftfleet.json")  # an upload cut short
    shutil.rmtree(local)
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        store.adapters.local_folder("remote")
    store.close()


def test_a_writer_killed_mid_write_leaves_no_record_pointing_at_a_missing_file(tmp_path):
    """Kill a process that registers adapters in a loop, at several moments; then check invariants."""
    url, home, storage = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "home", tmp_path / "artifacts"
    store = JobStore(url, home=home, storage_url=storage)
    base = save_base(tmp_path / "base", 1)
    fingerprint = store.register_base_model(str(base)).fingerprint
    model = peft_methods.apply(load_base(base), {"method": "lora", "r": 64, "target_modules": ["*"]})
    # a ~1 MB-per-layer adapter of random bytes, so each copy takes a while
    big = {k: torch.randn(v.shape) for k, v in peft_methods.adapter_state_dict(model).items()}
    peft_methods.get_method("lora").load_adapter_state_dict(model, big)
    folder = peft_methods.save_adapter(model, tmp_path / "big", metadata={"base_fingerprint": fingerprint})

    registered = 0
    for delay in (0.5, 1.0, 1.7, 2.4):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.store_workers", url, str(home), str(storage), str(folder), fingerprint],
            stdout=subprocess.PIPE, text=True,
        )
        first = child.stdout.readline()  # wait until the child is registering
        assert first.startswith("registered"), first
        time.sleep(delay)
        child.kill()
        child.wait()
        registered += 1

    reopened = JobStore(url, home=home, storage_url=storage)
    with reopened.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    records = reopened.adapters.list()
    assert len(records) >= registered
    for record in records:
        reopened.adapters.local_folder(record.name)  # exists and verifies
    recorded = {r.uri.rsplit("/", 1)[-1] for r in records}
    finished = {p.name for p in (storage / "adapters").iterdir() if not p.name.startswith(".")}
    assert recorded <= finished
    assert len(finished - recorded) <= 4, "more than one unrecorded artifact per kill"
    for leftover in (storage / "adapters").glob(".*"):
        assert ".tmp-" in leftover.name  # partial copies only ever live under a temporary name


def _register_with(store, tmp_path, bases, in_transaction, name="atomic"):
    folder, _ = make_adapter(tmp_path, bases["a"])
    return store.adapters.register(
        folder, name=name, base_fingerprint=bases["a"][1], task="sequence-classification", task_name="t",
        in_transaction=in_transaction,
    )


def test_in_transaction_lands_with_the_adapter(store, bases, tmp_path):
    job = store.submit(minilm_spec())

    def finish(s):
        s.execute(update(JobRow).where(JobRow.id == job.id).values(state="SUCCEEDED"))

    record = _register_with(store, tmp_path, bases, finish)
    assert store.get(job.id).state.value == "SUCCEEDED"
    assert store.adapters.get("atomic") == record and os.path.isdir(record.uri)


@pytest.mark.parametrize("error", [RuntimeError("job was cancelled"), None])
def test_a_failing_in_transaction_registers_nothing_and_removes_the_files(store, bases, tmp_path, error):
    job = store.submit(minilm_spec())

    def fail(s):
        s.execute(update(JobRow).where(JobRow.id == job.id).values(state="SUCCEEDED"))
        if error is not None:
            raise error
        s.add(AdapterTagRow(adapter_id="no-such-adapter", tag="x"))  # an IntegrityError of the caller's own
        s.flush()

    with pytest.raises(type(error) if error else IntegrityError) as raised:
        _register_with(store, tmp_path, bases, fail)
    if error is not None:
        assert raised.value is error  # unchanged, not wrapped
    with pytest.raises(AdapterNotFound):
        store.adapters.get("atomic")
    assert store.get(job.id).state.value == "PENDING"
    assert list((tmp_path / "artifacts").glob("adapters/*")) == []
    assert list((tmp_path / "artifacts").glob("adapters/.*")) == []
