"""BitFit: biases only, and what happens on models without biases."""

from __future__ import annotations

import pytest
import torch

import peft_methods
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA


@pytest.mark.parametrize("case", [TINY_BERT, MINILM], ids=lambda c: c.name)
def test_trains_every_bias_of_an_encoder_and_its_head(case):
    base = case.fresh()
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    head_weight = base.classifier.weight.numel()
    model = peft_methods.apply(base, {"method": "bitfit"})
    assert peft_methods.get_method("bitfit").num_adapter_parameters(model) == biases + head_weight
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")
    }


def test_llama_gets_zero_biases_that_leave_outputs_unchanged():
    batch = {k: v for k, v in TINY_LLAMA.batch().items() if k != "labels"}
    base = TINY_LLAMA.fresh()
    assert not any(n.endswith(".bias") for n, _ in base.named_parameters())
    with torch.no_grad():
        expected = base(**batch).logits
    model = peft_methods.apply(base, {"method": "bitfit"})
    cfg = model.config
    per_layer = 3 * cfg.hidden_size + 2 * cfg.num_key_value_heads * cfg.head_dim + 2 * cfg.intermediate_size
    # q and o project to hidden_size, k and v to kv-heads × head_dim, gate and up to intermediate, down to hidden
    assert peft_methods.get_method("bitfit").num_adapter_parameters(model) == cfg.num_hidden_layers * per_layer
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


def test_a_bias_free_model_is_refused_when_adding_biases_is_off():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias parameters to train"):
        peft_methods.apply(TINY_LLAMA.fresh(), {"method": "bitfit", "add_missing_biases": False})


def test_added_biases_can_be_restricted_by_pattern():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "bitfit", "target_modules": ["down_proj"]})
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"down_proj"}
