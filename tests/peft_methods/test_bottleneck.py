"""Bottleneck adapters: placement, parameter counts, near-identity start, adapter arithmetic."""

from __future__ import annotations

import pydantic
import pytest
import torch

import peft_methods
from peft_methods.bottleneck import BottleneckLinear
from tests.conftest import TINY_BERT, TINY_LLAMA, randomize_adapter

CASES = [TINY_BERT, TINY_LLAMA]
# Output projections of the attention and the feed-forward sublayer, by case.
SUBLAYERS = {"tiny-bert": ("attention.output.dense", "output.dense"), "tiny-llama": ("o_proj", "down_proj")}


def _inputs(case):
    return {k: v for k, v in case.batch().items() if k != "labels"}


def _adapted(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckLinear)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("reduction_factor", [4, 16, 64])
def test_parameter_count_is_two_projections_with_biases_per_adapted_sublayer(
    case, placement, per_block, reduction_factor
):
    base = case.fresh()
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    head = sum(p.numel() for p in base.classifier.parameters()) if case.classification else 0
    model = peft_methods.apply(
        base, {"method": "bottleneck", "placement": placement, "reduction_factor": reduction_factor}
    )
    b = max(1, hidden // reduction_factor)  # 64 > hidden: the bottleneck still keeps one unit
    assert len(_adapted(model)) == layers * per_block
    expected = layers * per_block * (2 * hidden * b + b + hidden) + head
    assert peft_methods.get_method("bottleneck").num_adapter_parameters(model) == expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_houlsby_adapts_attention_and_ffn_outputs_and_pfeiffer_only_the_ffn(case):
    attention, ffn = SUBLAYERS[case.name]
    layers = case.fresh().config.num_hidden_layers
    houlsby = _adapted(peft_methods.apply(case.fresh(), {"method": "bottleneck"}))
    pfeiffer = _adapted(peft_methods.apply(case.fresh(), {"method": "bottleneck", "placement": "pfeiffer"}))
    assert sum(n.endswith("." + attention) for n in houlsby) == layers
    assert len(houlsby) == 2 * layers
    assert len(pfeiffer) == layers
    assert all(n.endswith("." + ffn) and not n.endswith("." + attention) for n in pfeiffer)
    assert set(pfeiffer) < set(houlsby)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_training_starts_from_the_base_models_outputs(case):
    batch = _inputs(case)
    with torch.no_grad():
        expected = case.fresh()(**batch).logits
        model = peft_methods.apply(case.fresh(), {"method": "bottleneck"})
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=0)
        # A small init_scale moves the outputs a little, not a lot.
        nudged = peft_methods.apply(case.fresh(), {"method": "bottleneck", "init_scale": 1e-4})
        out = nudged(**batch).logits
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "nonlinearity,act",
    [
        ("relu", torch.relu),
        ("gelu", torch.nn.functional.gelu),
        ("silu", torch.nn.functional.silu),
        ("tanh", torch.tanh),
    ],
)
def test_adapter_adds_up_of_act_of_down_to_the_projection_output(nonlinearity, act):
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "bottleneck", "nonlinearity": nonlinearity})
    randomize_adapter(model, scale=0.5)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, layer.base_layer.in_features)
    with torch.no_grad():
        y = x @ layer.base_layer.weight.T
        h = act(y @ layer.adapter_down.weight.T + layer.adapter_down.bias)
        expected = y + h @ layer.adapter_up.weight.T + layer.adapter_up.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_the_adapter_sits_before_berts_residual_and_layernorm():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "bottleneck"})
    block = model.bert.encoder.layer[0]
    assert isinstance(block.attention.output.dense, BottleneckLinear)
    assert isinstance(block.output.dense, BottleneckLinear)
    assert isinstance(block.attention.output.LayerNorm, torch.nn.LayerNorm)  # untouched and frozen
    assert not block.attention.output.LayerNorm.weight.requires_grad


def test_only_adapter_and_head_parameters_are_trainable():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "bottleneck"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".adapter_down." in n or ".adapter_up." in n or n.startswith("classifier.") for n in trainable)


def test_cannot_be_merged():
    assert peft_methods.get_method("bottleneck").mergeable is False
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "bottleneck"})
    with pytest.raises(NotImplementedError):
        peft_methods.merge(model)


@pytest.mark.parametrize(
    "bad,field",
    [({"reduction_factor": 0}, "reduction_factor"), ({"reduction_factor": -2}, "reduction_factor"),
     ({"nonlinearity": "swish"}, "nonlinearity"), ({"placement": "middle"}, "placement"),
     ({"init_scale": -0.1}, "init_scale")],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "bottleneck", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]


def test_unknown_family_is_refused_clearly():
    model = TINY_BERT.fresh()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default adapter placement for model family 'mystery'"):
        peft_methods.apply(model, {"method": "bottleneck"})
