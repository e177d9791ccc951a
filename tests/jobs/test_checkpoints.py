"""Verified checkpoints: a restore loads only a folder that matches its record in the store (written by
the job's rank 0 when it checkpointed), and DeepSpeed's files are read with ``weights_only=True``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.training.checkpoints import STEP_FILE, CheckpointRejected, manifest, verified_copy, verify
from tests.jobs.test_base_group import run_group, trec
from tests.jobs.test_recipe import losses, run_recipe, store_job


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


# -- the folder checks on their own -----------------------------------------------------------------
@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "root" / "ckpt"
    (root / "peftfleet").mkdir(parents=True)
    (root / "peftfleet" / "model.pt").write_bytes(b"tensor bytes" * 100)
    (root / STEP_FILE).write_text('{"job_id": "j", "step": 4}')
    return root


def test_manifest_hashes_every_file_and_verify_accepts_the_untouched_folder(folder):
    files = manifest(folder)
    assert sorted(files) == ["peftfleet/model.pt", STEP_FILE]
    verify(folder, files, root=folder.parent)
    with verified_copy(folder, files, root=folder.parent) as private:
        assert manifest(private) == files and not Path(private).resolve().is_relative_to(folder.resolve())


def _flip_byte(folder: Path, tmp_path: Path) -> None:
    path = folder / "peftfleet" / "model.pt"
    data = bytearray(path.read_bytes())
    data[7] ^= 1
    path.write_bytes(bytes(data))


def _add_file(folder: Path, tmp_path: Path) -> None:
    (folder / "peftfleet" / "extra.pt").write_bytes(b"x")


def _remove_file(folder: Path, tmp_path: Path) -> None:
    (folder / STEP_FILE).unlink()


def _symlink_file(folder: Path, tmp_path: Path) -> None:  # the same bytes, through a link
    target = tmp_path / "elsewhere.pt"
    shutil.copy(folder / "peftfleet" / "model.pt", target)
    (folder / "peftfleet" / "model.pt").unlink()
    (folder / "peftfleet" / "model.pt").symlink_to(target)


def _fifo(folder: Path, tmp_path: Path) -> None:
    os.mkfifo(folder / "peftfleet" / "pipe")


@pytest.mark.parametrize(("tamper", "why"), [
    (_flip_byte, "model.pt does not match its recorded sha256"),
    (_add_file, "extra.pt is not in its record"),
    (_remove_file, f"{STEP_FILE} is missing"),
    (_symlink_file, "model.pt is a symlink"),
    (_fifo, "pipe is not a regular file or folder"),
])
def test_a_tampered_folder_is_refused(folder, tmp_path, tamper, why):
    files = manifest(folder)
    tamper(folder, tmp_path)
    with pytest.raises(CheckpointRejected, match=why):
        verify(folder, files, root=folder.parent)
    with pytest.raises(CheckpointRejected, match=why), verified_copy(folder, files, root=folder.parent):
        pass


def test_a_folder_outside_the_root_or_reached_through_a_link_is_refused(folder, tmp_path):
    files = manifest(folder)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CheckpointRejected, match="outside the checkpoint root"):
        verify(folder, files, root=other)
    link = other / "ckpt"
    link.symlink_to(folder)
    with pytest.raises(CheckpointRejected, match="is a symlink"):
        verify(link, files, root=folder.parent)
    escape = other / "escape"  # a path under the root that resolves outside it
    escape.mkdir()
    with pytest.raises(CheckpointRejected, match="outside the checkpoint root"):
        verify(escape / ".." / ".." / "root" / "ckpt", files, root=other)


def test_manifest_refuses_a_symlink(folder, tmp_path):
    _symlink_file(folder, tmp_path)
    with pytest.raises(CheckpointRejected, match="symlink"):
        manifest(folder)


# -- restores through the recipe (solo, DeepSpeed) ----------------------------------------------------
def solo_spec(base: Path, zero_stage: int = 0, precision: str = "fp32") -> dict:
    return {
        "name": f"verified-z{zero_stage}-{precision}", "base_model": str(base), "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 64}, "method": {"method": "lora", "r": 4},
        "training": {"max_steps": 8, "batch_size": 8, "lr": 0.01, "eval_size": 16, "max_length": 32,
                     "checkpoint_every_steps": 4, "eval_every_steps": 4},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
    }


class Evil:
    """Unpickled, it makes a folder: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _copy(checkpoint: str, to: Path) -> Path:
    shutil.copytree(checkpoint, to)
    return to


def _model_states(folder: Path) -> Path:
    (path,) = folder.glob("peftfleet/mp_rank_00_model_states.pt")
    return path


def test_a_tampered_solo_checkpoint_is_refused_before_anything_is_unpickled(tmp_path, tiny_bert_dir):
    spec = solo_spec(tiny_bert_dir)
    job = store_job(tmp_path, spec)
    full = run_recipe(tmp_path, spec, store=job)
    (_, genuine), = full["checkpoints"]
    root = Path(job["root"])
    marker = tmp_path / "pickle-ran"
    cases: dict[str, Path] = {}

    cases["byte"] = folder = _copy(genuine, root / "byte")
    data = bytearray(_model_states(folder).read_bytes())
    data[-40] ^= 1
    _model_states(folder).write_bytes(bytes(data))
    cases["added"] = folder = _copy(genuine, root / "added")
    (folder / "peftfleet" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"extra")
    cases["symlink"] = folder = _copy(genuine, root / "symlink")  # identical bytes, through a link
    _model_states(folder).unlink()
    (folder / "peftfleet" / "mp_rank_00_model_states.pt").symlink_to(_model_states(Path(genuine)))
    cases["outside"] = _copy(genuine, tmp_path / "outside")  # untouched, but not under the checkpoint root
    cases["unrecorded"] = folder = _copy(genuine, root / "unrecorded")
    (folder / STEP_FILE).write_text(f'{{"job_id": "{job["job_id"]}", "step": 6}}')  # no record at step 6
    cases["pickle"] = folder = _copy(genuine, root / "pickle")
    torch.save({"module": Evil(marker)}, _model_states(folder))

    runs = [{**job, "resume": str(folder)} for folder in cases.values()] + [{**job, "resume": genuine}]
    results = run_recipe(tmp_path, [spec] * len(runs), store=runs)
    assert not marker.exists()
    refused = dict(zip(cases, results))
    for case, why in [("byte", "mp_rank_00_model_states.pt does not match its recorded sha256"),
                      ("added", "zero_pp_rank_1_mp_rank_00_optim_states.pt is not in its record"),
                      ("symlink", "mp_rank_00_model_states.pt is a symlink"),
                      ("outside", "outside the checkpoint root"),
                      ("unrecorded", "the store has no record of job"),
                      ("pickle", "mp_rank_00_model_states.pt does not match its recorded sha256")]:
        error = refused[case].get("error") or ""
        assert error.startswith("CheckpointRejected") and why in error, (case, error)
        assert not any(kind == "started" for kind, _ in refused[case]["events"]), case  # nothing trained

    resumed = results[-1]  # the untouched checkpoint: restored, and training continues identically
    assert resumed["events"][0][1]["resumed"] and resumed["events"][0][1]["step"] == 4
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-4), step


def test_a_checkpoint_matching_a_forged_record_still_cannot_run_a_pickle(tmp_path, tiny_bert_dir):
    """Whoever could write the store's record too gets no further: DeepSpeed's files are read with
    ``weights_only=True``, which refuses the pickle's callable."""
    from jobs.store import JobStore

    spec = solo_spec(tiny_bert_dir)
    job = store_job(tmp_path, spec)
    full = run_recipe(tmp_path, spec, store=job)
    (_, genuine), = full["checkpoints"]
    marker = tmp_path / "pickle-ran"
    forged = _copy(genuine, Path(job["root"]) / "forged")
    torch.save({"module": Evil(marker)}, _model_states(forged))
    store = JobStore(job["url"], storage_url=Path(job["root"]) / "artifacts", home=Path(job["root"]) / "home")
    store.checkpoints.record(job["job_id"], 9, 4, str(forged), manifest(forged))
    store.close()
    (result,) = run_recipe(tmp_path, [spec], store=[{**job, "resume": str(forged)}])
    assert not marker.exists()
    assert result["error"].startswith("UnpicklingError") and "Weights only load failed" in result["error"]


@pytest.mark.parametrize("stages", [[(0, "fp32"), (1, "fp32"), (2, "fp32"), (2, "bf16")],
                                    [(3, "bf16")]],  # ZeRO-3 in a process of its own (see test_recipe)
                         ids=["zero-0-1-2", "zero-3"])
def test_deepspeed_checkpoints_of_every_zero_stage_restore_with_weights_only(tmp_path, tiny_bert_dir, stages):
    specs = [solo_spec(tiny_bert_dir, zero, precision) for zero, precision in stages]
    jobs = [store_job(tmp_path, spec) for spec in specs]
    full = run_recipe(tmp_path, specs, store=jobs)
    resumed = run_recipe(tmp_path, specs, store=jobs)  # each from its job's latest record
    for (zero, precision), before, after in zip(stages, full, resumed):
        assert "error" not in after, (zero, precision, after.get("error"))
        assert after["events"][0][1]["resumed"] and after["events"][0][1]["step"] == 4, (zero, precision)
        assert sorted(losses(after)) == [5, 6, 7, 8]
        for step, value in losses(after).items():
            assert value == pytest.approx(losses(before)[step], rel=1e-3), (zero, precision, step)


# -- restores of a base group's member ------------------------------------------------------------------
def test_a_tampered_group_checkpoint_is_refused_and_an_untouched_one_resumes(tmp_path, tiny_bert_dir):
    spec = trec("member", {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=8, checkpoint_every_steps=4,
                lr=0.01)
    job = store_job(tmp_path, spec)
    full = run_group(tmp_path, {"specs": [spec], "stores": {"0": job}})["members"][0]
    (_, genuine), = full["checkpoints"]
    root = Path(job["root"])
    byte = _copy(genuine, root / "byte")
    data = bytearray((byte / "adapter.safetensors").read_bytes())
    data[-3] ^= 1
    (byte / "adapter.safetensors").write_bytes(bytes(data))
    added = _copy(genuine, root / "added")
    (added / "optimizer.pt").write_bytes(b"extra")
    outside = _copy(genuine, tmp_path / "outside")
    stores = {str(i): {**job, "resume": str(folder)} for i, folder in enumerate([byte, added, outside, genuine])}
    members = run_group(tmp_path, {"specs": [spec] * 4, "stores": stores})["members"]
    for member, why in zip(members, ["adapter.safetensors does not match its recorded sha256",
                                     "optimizer.pt is not in its record", "outside the checkpoint root"]):
        assert member["rejected"] and why in member["rejected"], member["rejected"]
        assert not member["events"]  # it never joined
    resumed = members[3]
    assert resumed["rejected"] is None and resumed["events"][0][1]["step"] == 4
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-5), step


# -- the record itself -------------------------------------------------------------------------------------
def test_a_checkpoint_is_recorded_only_by_the_runner_holding_the_jobs_attempt(store, folder):
    from jobs.store import OwnershipLost
    from tests.jobs.conftest import minilm_spec

    job = store.claim(store.submit(minilm_spec()).id, "runner-1", reason="test")
    files = manifest(folder)
    store.checkpoints.record(job.id, job.attempt, 4, str(folder), files, owner="runner-1")
    for owner, attempt in [("runner-2", job.attempt), ("runner-1", job.attempt + 1)]:
        with pytest.raises(OwnershipLost, match="checkpoint not recorded"):
            store.checkpoints.record(job.id, attempt, 8, str(folder), files, owner=owner)
    assert [(r.attempt, r.step) for r in store.checkpoints.list(job.id)] == [(job.attempt, 4)]
    assert store.checkpoints.latest(job.id).files == files
