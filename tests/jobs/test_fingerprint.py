"""Base fingerprints: content hashes of config + weights, cached by path, size and mtime."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs.store import fingerprint
from tests.conftest import tiny_bert


def saved(folder, seed=1):
    torch.manual_seed(seed)
    tiny_bert().save_pretrained(folder)
    return folder


def test_same_weights_same_fingerprint_different_weights_different(tmp_path):
    a, a_copy, b = saved(tmp_path / "a"), saved(tmp_path / "a2"), saved(tmp_path / "b", seed=2)
    fa = fingerprint.base_fingerprint(a)
    assert fa.startswith("sha256:") and len(fa) == 7 + 64
    assert fingerprint.base_fingerprint(a_copy) == fa  # content, not location
    assert fingerprint.base_fingerprint(b) != fa


def test_config_changes_that_matter_change_it_and_saving_noise_does_not(tmp_path):
    folder = saved(tmp_path / "m")
    before = fingerprint.compute_fingerprint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "9.9.9"
    (folder / "config.json").write_text(json.dumps(config))
    assert fingerprint.compute_fingerprint(folder) == before
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert fingerprint.compute_fingerprint(folder) != before


def test_cached_until_a_file_changes(tmp_path, monkeypatch):
    folder = saved(tmp_path / "m")
    calls = []
    real = fingerprint.compute_fingerprint
    monkeypatch.setattr(fingerprint, "compute_fingerprint", lambda f: calls.append(f) or real(f))
    first = fingerprint.base_fingerprint(folder)
    assert fingerprint.base_fingerprint(folder) == first and len(calls) == 1
    saved(folder, seed=3)  # rewrite the weights in place
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert fingerprint.base_fingerprint(folder) != first and len(calls) == 2
    cache = json.loads((fingerprint.peftfleet_home() / "fingerprints.json").read_text())
    assert list(cache.values()) == [fingerprint.base_fingerprint(folder)], "the stale entry was kept"


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors are loaded"):
        fingerprint.base_fingerprint(tmp_path)
