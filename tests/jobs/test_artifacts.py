"""Artifact storage on real folders and a real fsspec filesystem: publishing copies only what the
manifest lists, never through a symbolic link, and only what verified; leftovers are found."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import peft_methods
from jobs.store.artifacts import ArtifactStorage
from peft_methods import AdapterIntegrityError
from peft_methods.adapter_files import read_manifest
from tests.conftest import TINY_BERT, randomize_adapter

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "peftfleet.json"]


@pytest.fixture
def adapter(tmp_path):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "r": 2})
    randomize_adapter(model)
    return peft_methods.save_adapter(model, tmp_path / "adapter")


@pytest.fixture
def local(tmp_path):
    return ArtifactStorage(tmp_path / "artifacts", home=tmp_path / "home")


@pytest.fixture
def remote(tmp_path):
    return ArtifactStorage(f"memory://artifacts-{uuid.uuid4().hex[:8]}", home=tmp_path / "home")


def age(path: Path, seconds: float) -> None:
    """Make ``path`` and everything in it look ``seconds`` old."""
    stamp = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (stamp, stamp), follow_symlinks=False)


def remote_files(storage: ArtifactStorage, uri: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in storage.fs.find(storage.fs._strip_protocol(uri)))


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_publish_copies_only_the_listed_files_and_no_link(adapter, tmp_path, kind, request):
    storage = request.getfixturevalue(kind)
    (tmp_path / "secret.txt").write_text("not for the artifact store")
    (adapter / "notes.txt").write_text("an unlisted file")
    (adapter / "link").symlink_to(tmp_path / "secret.txt")
    (adapter / "sub").mkdir()
    uri = storage.publish(adapter, "adapters/a1")
    if kind == "local":
        assert sorted(p.name for p in Path(uri).iterdir()) == ADAPTER_FILES
    else:
        assert remote_files(storage, uri) == ADAPTER_FILES
    read_manifest(storage.local_path(uri))


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_symlink_in_place_of_a_listed_file_is_refused(adapter, tmp_path, kind, request):
    storage = request.getfixturevalue(kind)
    weights = adapter / "adapter_model.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    weights.rename(elsewhere)
    weights.symlink_to(elsewhere)  # same bytes, so the hashes match: only the link itself is wrong
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors is a symbolic link"):
        storage.publish(adapter, "adapters/a1")
    if kind == "local":
        assert list(Path(storage.root).rglob("*")) == []  # no copy, no temp folder
    else:
        assert not storage.fs.exists(f"{storage.root}/adapters/a1")


def test_a_folder_changed_after_its_check_is_not_published(adapter, local):
    """The copy is what gets verified: swapping a file between the check and the copy is caught."""

    def verify_then_tamper(folder):
        manifest = read_manifest(folder)
        if folder == adapter:
            tensors = {k: v + 1 for k, v in load_file(folder / "adapter_model.safetensors").items()}
            save_file(tensors, folder / "adapter_model.safetensors")
        return manifest

    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors sha256"):
        local.publish(adapter, "adapters/a1", verify=verify_then_tamper)
    assert list((Path(local.root) / "adapters").iterdir()) == []


def test_publish_refuses_a_manifest_other_than_the_one_expected(adapter, local):
    with pytest.raises(AdapterIntegrityError, match="changed while it was being published"):
        local.publish(adapter, "adapters/a1", manifest_sha256="0" * 64)
    assert list((Path(local.root) / "adapters").iterdir()) == []


def test_a_download_fetches_only_the_listed_files(adapter, remote):
    uri = remote.publish(adapter, "adapters/a1")
    base = remote.fs._strip_protocol(uri)
    remote.fs.pipe(f"{base}/extra.bin", b"planted after publishing")
    assert sorted(p.name for p in remote.local_path(uri).iterdir()) == ADAPTER_FILES


@pytest.mark.parametrize("bad", ["../../escape", "sub/x", "/etc/passwd", ".."])
def test_a_download_refuses_a_manifest_naming_paths(adapter, remote, tmp_path, bad):
    uri = remote.publish(adapter, "adapters/a1")
    base = remote.fs._strip_protocol(uri)
    manifest = json.loads(remote.fs.cat_file(f"{base}/peftfleet.json"))
    manifest["files"][bad] = "0" * 64
    remote.fs.pipe(f"{base}/peftfleet.json", json.dumps(manifest).encode())
    with pytest.raises(AdapterIntegrityError, match="is not a plain file name"):
        remote.local_path(uri)
    assert not (tmp_path / "escape").exists()
    cache = tmp_path / "home" / "cache" / "artifacts"
    assert [p.name for p in cache.iterdir()] == []


def test_clean_temp_removes_only_old_temporary_folders(local, tmp_path):
    root = Path(local.root)
    old = [root / "adapters" / ".a1.tmp-0123abcd", root / "subspaces" / ".s1.tmp-89abcdef",
           tmp_path / "home" / "cache" / "artifacts" / ".bucket__adapters__x.tmp-00ff00ff"]
    young = root / "adapters" / ".a2.tmp-fedcba98"  # a publish in progress
    kept = [root / "adapters" / "a3", root / "adapters" / ".a4.old", young]
    for folder in old + kept:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    for folder in old + kept[:2]:
        age(folder, 3600)
    assert sorted(local.clean_temp(older_than_s=600)) == sorted(map(str, old))
    assert all(not p.exists() for p in old) and all(p.exists() for p in kept)
    assert local.clean_temp(older_than_s=600) == []


def test_clean_temp_tells_age_by_the_newest_file(local):
    folder = Path(local.root) / "adapters" / ".a1.tmp-0123abcd"
    folder.mkdir(parents=True)
    (folder / "peftfleet.json").write_text("{}")
    age(folder, 3600)
    (folder / "adapter_model.safetensors").write_bytes(b"still being copied")
    os.utime(folder, (time.time() - 3600,) * 2)
    assert local.clean_temp(older_than_s=600) == []


def test_abandoned_lists_old_unrecorded_artifacts(adapter, local):
    recorded = local.publish(adapter, "adapters/recorded")
    stray = local.publish(adapter, "adapters/stray")
    fresh = local.publish(adapter, "adapters/fresh")
    subspace = Path(local.root) / "subspaces" / "s1"
    subspace.mkdir(parents=True)
    for path in (recorded, stray, subspace):
        age(Path(path), 3600)
    (Path(local.root) / "adapters" / ".x.tmp-0123abcd").mkdir()
    found = local.abandoned({recorded}, older_than_s=600)
    assert sorted(found) == sorted([stray, str(subspace)])
    assert fresh not in found


def test_abandoned_on_fsspec_storage_finds_an_upload_cut_short(adapter, remote):
    recorded = remote.publish(adapter, "adapters/recorded")
    base = remote.fs._strip_protocol(remote.uri_for("adapters/cut"))
    remote.fs.pipe(f"{base}/adapter_config.json", b"{}")  # the manifest never arrived
    time.sleep(0.01)
    assert remote.abandoned({recorded}, older_than_s=0) == [remote.uri_for("adapters/cut")]
    assert remote.abandoned({recorded}, older_than_s=3600) == []
