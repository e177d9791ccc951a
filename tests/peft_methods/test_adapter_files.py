"""The adapter folder: hashes, tamper detection, atomic writes, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_methods
from peft_methods import AdapterIntegrityError
from peft_methods.adapter_files import read_adapter, sha256_file
from tests.conftest import TINY_BERT, randomize_adapter


@pytest.fixture
def saved(tmp_path):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "r": 2})
    randomize_adapter(model)
    return model, peft_methods.save_adapter(model, tmp_path / "adapter", metadata={"job_id": "j1"})


def test_folder_layout_and_manifest(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "peftfleet.json",
    ]
    manifest = json.loads((path / "peftfleet.json").read_text())
    assert manifest["method"] == "lora" and manifest["config"]["r"] == 2
    assert manifest["files"] == {n: sha256_file(path / n) for n in ("adapter_config.json", "adapter_model.safetensors")}
    tensors = load_file(path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model." + k for k in peft_methods.adapter_state_dict(model)}
    assert manifest["num_parameters"] == sum(t.numel() for t in tensors.values())


def test_tampered_weights_are_refused(saved):
    _, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors sha256 .* does not match"):
        peft_methods.load_adapter(TINY_BERT.fresh(), path)


def test_tampered_config_is_refused(saved):
    _, path = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 3
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterIntegrityError, match="adapter_config.json sha256"):
        peft_methods.load_adapter(TINY_BERT.fresh(), path)


def test_a_missing_file_or_manifest_is_refused(saved):
    _, path = saved
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors is missing"):
        peft_methods.read_manifest(path)
    (path / "peftfleet.json").unlink()
    with pytest.raises(AdapterIntegrityError, match="no peftfleet.json"):
        peft_methods.read_manifest(path)


def test_an_adapter_for_another_architecture_is_refused(saved):
    from tests.conftest import tiny_bert

    _, path = saved
    torch.manual_seed(0)
    other = tiny_bert()
    other.classifier = torch.nn.Linear(32, 5)  # a head of a different size
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias) has shape"):
        peft_methods.load_adapter(other, path)


def test_existing_folder_needs_overwrite_and_is_replaced_whole(saved, tmp_path):
    model, path = saved
    with pytest.raises(FileExistsError):
        peft_methods.save_adapter(model, path)
    randomize_adapter(model)
    peft_methods.save_adapter(model, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "temporary folders left behind"
    reloaded = peft_methods.load_adapter(TINY_BERT.fresh(), path)
    for k, v in peft_methods.adapter_state_dict(model).items():
        assert torch.equal(peft_methods.adapter_state_dict(reloaded)[k], v)


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora"})
    lora = peft_methods.get_method("lora")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "adapter_config", explode)
    with pytest.raises(OSError, match="disk full"):
        peft_methods.save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_saving_a_model_without_a_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no PEFT method is applied"):
        peft_methods.save_adapter(TINY_BERT.fresh(), tmp_path / "adapter")


def rewrite_manifest(path, edit):
    manifest = json.loads((path / "peftfleet.json").read_text())
    edit(manifest)
    (path / "peftfleet.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../outside.txt", "sub/x", "/ABSOLUTE", ".", "..", "", "a\0b", "x" * 256, "a\\b"])
def test_a_manifest_naming_anything_but_a_plain_file_is_refused(saved, tmp_path, bad):
    _, path = saved
    outside = tmp_path / "outside.txt"
    outside.write_text("a file outside the adapter folder")
    (path / "sub").mkdir()
    (path / "sub" / "x").write_text("in a subfolder")
    name = str(outside) if bad == "/ABSOLUTE" else bad
    digest = sha256_file(outside) if name in ("../outside.txt", str(outside)) else "0" * 64
    if bad == "sub/x":
        digest = sha256_file(path / "sub" / "x")
    rewrite_manifest(path, lambda m: m["files"].update({name: digest}))  # hashes that match, where a file exists
    with pytest.raises(AdapterIntegrityError, match="is not a plain file name"):
        peft_methods.read_manifest(path)


def test_a_manifest_must_list_exactly_the_adapter_files(saved):
    _, path = saved
    (path / "notes.txt").write_text("extra")
    rewrite_manifest(path, lambda m: m["files"].update({"notes.txt": sha256_file(path / "notes.txt")}))
    with pytest.raises(AdapterIntegrityError, match="lists files a adapter does not hold: notes.txt"):
        peft_methods.read_manifest(path)


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"format_version": 1, "files": ["adapter_config.json"]}'])
def test_a_malformed_manifest_is_a_one_line_error(saved, manifest):
    _, path = saved
    (path / "peftfleet.json").write_text(manifest)
    with pytest.raises(AdapterIntegrityError, match="peftfleet.json (is not a JSON object|has no files table)"):
        peft_methods.read_manifest(path)


def test_a_symlinked_file_is_never_followed(saved, tmp_path):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    weights.rename(tmp_path / "elsewhere")
    weights.symlink_to(tmp_path / "elsewhere")  # the very bytes the manifest hashes
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors is a symbolic link"):
        peft_methods.read_manifest(path)
    with pytest.raises(AdapterIntegrityError, match="symbolic link"):
        peft_methods.load_adapter(TINY_BERT.fresh(), path)


def test_the_bytes_verified_are_the_bytes_loaded(saved, monkeypatch):
    """Swap the weights file right after its hash is taken: what loads is still what was hashed."""
    import hashlib

    from peft_methods import adapter_files

    model, path = saved
    weights = path / "adapter_model.safetensors"
    expected = json.loads((path / "peftfleet.json").read_text())["files"]["adapter_model.safetensors"]
    tampered = {k: v + 1 for k, v in load_file(weights).items()}

    class SwapAfterHashing:
        def __init__(self, *args):
            self.real = hashlib.sha256(*args)

        def update(self, data):
            self.real.update(data)

        def hexdigest(self):
            digest = self.real.hexdigest()
            if digest == expected:
                save_file(tampered, weights)  # a writer racing the loader
            return digest

    monkeypatch.setattr(adapter_files, "hashlib", type("shim", (), {"sha256": SwapAfterHashing}))
    config, state, _ = read_adapter(path)
    for k, v in peft_methods.adapter_state_dict(model).items():
        assert torch.equal(state[k], v)
    assert sha256_file(weights) != expected  # the file did change underneath


def test_a_manifest_other_than_the_registered_one_is_refused(saved):
    _, path = saved
    with pytest.raises(AdapterIntegrityError, match="peftfleet.json is not the one registered"):
        read_adapter(path, manifest_sha256="0" * 64)
    read_adapter(path, manifest_sha256=sha256_file(path / "peftfleet.json"))


@pytest.mark.parametrize("bad", ["../escape.safetensors", "extra.safetensors"])
def test_a_subspace_description_names_only_its_tensor_file(tmp_path, bad):
    from peft_methods.ipt import read_subspace_info, save_subspace

    folder = save_subspace(
        tmp_path / "subspace", {"out_weight": torch.zeros(8, 2), "out_bias": torch.zeros(8)}, torch.zeros(2),
        num_virtual_tokens=2, hidden_size=4,
    )
    target = folder / bad if "/" not in bad else tmp_path / "escape.safetensors"
    target.write_bytes((folder / "subspace.safetensors").read_bytes())
    info = json.loads((folder / "subspace.json").read_text())
    info["files"][bad] = sha256_file(target)
    (folder / "subspace.json").write_text(json.dumps(info))
    with pytest.raises(AdapterIntegrityError, match="not a plain file name|does not hold"):
        read_subspace_info(folder)
