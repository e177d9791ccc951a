"""The adapter folder: hashes, tamper detection, atomic writes, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_methods
from peft_methods import AdapterIntegrityError
from peft_methods.adapter_files import sha256_file
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
