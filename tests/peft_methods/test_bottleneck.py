"""Bottleneck adapters: placement, parameter counts, near-identity start, adapter arithmetic, trained norms."""

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
# Every norm of the backbone Houlsby et al. train: BERT's LayerNorms (weight and bias), LLaMA's RMSNorms (weight).
NORMS = {
    "tiny-bert": ["bert.embeddings.LayerNorm", *(f"bert.encoder.layer.{i}.{n}" for i in range(2)
                                               for n in ("attention.output.LayerNorm", "output.LayerNorm"))],
    "tiny-llama": [*(f"model.layers.{i}.{n}" for i in range(2)
                     for n in ("input_layernorm", "post_attention_layernorm")), "model.norm"],
}


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
    norms = (2 * layers + 1) * hidden * (2 if case is TINY_BERT else 1)  # LayerNorm: weight + bias; RMSNorm: weight
    expected = layers * per_block * (2 * hidden * b + b + hidden) + norms + head
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
    assert isinstance(block.attention.output.LayerNorm, torch.nn.LayerNorm)  # not wrapped: trained in place
    assert block.attention.output.LayerNorm.weight.requires_grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_by_default_every_norm_of_the_backbone_is_trained_and_saved_as_houlsby_et_al_do(case, tmp_path):
    model = peft_methods.apply(case.fresh(), {"method": "bottleneck"})
    method = peft_methods.get_method("bottleneck")
    norm_params = {n for n in method.trainable_parameter_names(model) if ".adapter_" not in n
                   and not n.startswith("classifier.")}
    assert {n.rpartition(".")[0] for n in norm_params} == set(NORMS[case.name])
    assert norm_params <= set(method.adapter_state_dict(model))
    groups = {g["name"]: g for g in method.optimizer_groups(model, sorted(method.trainable_parameter_names(model)),
                                                            lr=1e-3, head_lr=2e-3, weight_decay=0.1)}
    assert set(groups["norms"]["names"]) == norm_params  # the adapters' lr, no decay (adapter-bert's optimizer)
    assert (groups["norms"]["lr"], groups["norms"]["weight_decay"]) == (1e-3, 0.0)
    assert groups["adapter"]["weight_decay"] == 0.1 and not set(groups["adapter"]["names"]) & norm_params

    randomize_adapter(model, scale=0.3)
    inputs = _inputs(case)
    with torch.no_grad():
        expected = model(**inputs).logits
    folder = peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(case.fresh(), folder)
    assert torch.equal(reloaded.get_submodule(NORMS[case.name][-1]).weight,
                       model.get_submodule(NORMS[case.name][-1]).weight)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        # The trained norms matter: the same adapters over the base's norms give other outputs.
        without = peft_methods.apply(case.fresh(), {"method": "bottleneck", "train_layer_norms": False})
        method.load_adapter_state_dict(
            without, {k: v for k, v in method.adapter_state_dict(model).items() if k not in norm_params})
        assert not torch.allclose(without(**inputs).logits, expected, atol=1e-3)


def test_adapters_saved_before_norms_were_trained_still_load(tmp_path):
    """An adapter whose saved config predates ``train_layer_norms`` (so reads as the default) holds no norms."""
    import json

    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "bottleneck", "train_layer_norms": False})
    randomize_adapter(model)
    folder = peft_methods.save_adapter(model, tmp_path / "old")
    manifest = json.loads((folder / "peftfleet.json").read_text())
    del manifest["config"]["train_layer_norms"]
    (folder / "peftfleet.json").write_text(json.dumps(manifest))
    reloaded = peft_methods.load_adapter(TINY_BERT.fresh(), folder)
    assert peft_methods.applied_config(reloaded).train_layer_norms is False
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs(TINY_BERT)).logits, model(**_inputs(TINY_BERT)).logits)


@pytest.mark.parametrize("train_layer_norms", [True, False])
def test_only_adapter_head_and_norm_parameters_are_trainable(train_layer_norms):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "bottleneck", "train_layer_norms": train_layer_norms})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    norms = {n for n in trainable if ".LayerNorm." in n}
    assert all(".adapter_down." in n or ".adapter_up." in n or n.startswith("classifier.") for n in trainable - norms)
    assert len(norms) == (10 if train_layer_norms else 0)


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_norm_deltas_built_from_the_live_state_compute_the_norms_and_carry_their_gradients(case):
    """Packed training runs a bottleneck adapter through ``row_deltas(training_state)``: each trained norm's
    delta must give what the adapted model's norm gives, and its gradient must reach the norm's parameters."""
    from peft_methods.row_deltas import OwnParameters

    method = peft_methods.get_method("bottleneck")
    model = peft_methods.apply(case.fresh(), {"method": "bottleneck"})
    randomize_adapter(model, scale=0.3)
    state = {k: t for k, t in method.training_state(model).items() if not k.startswith("classifier.")}  # as packed
    deltas = [d for d in method.row_deltas(case.fresh(), peft_methods.applied_config(model), state)
              if isinstance(d, OwnParameters)]
    assert sorted(d.module for d in deltas) == sorted(NORMS[case.name])
    plain = case.fresh()
    x = torch.randn(2, 5, model.config.hidden_size)
    for delta in deltas:
        norm = model.get_submodule(delta.module)
        got = delta.apply(plain.get_submodule(delta.module), x, None)
        torch.testing.assert_close(got, norm(x), atol=1e-6, rtol=0)
        (via_delta,) = torch.autograd.grad(got.square().sum(), norm.weight)
        (direct,) = torch.autograd.grad(norm(x).square().sum(), norm.weight)
        torch.testing.assert_close(via_delta, direct)
