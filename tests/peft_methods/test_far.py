"""FAR: counts, frozen FFN weights, priming picks the units with the strongest gradient, merge, files."""

from __future__ import annotations

import pydantic
import pytest
import torch

import peft_methods
from peft_methods.far import FARLinear
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter

FAR = peft_methods.get_method("far")


def _inputs(case, seed=0):
    return {k: v for k, v in case.batch(seed=seed).items() if k != "labels"}


def _ffn(model, case):
    """(first FFN projections per block, the FFN output projection per block)."""
    if case is TINY_LLAMA:
        return [[m.mlp.gate_proj, m.mlp.up_proj] for m in model.model.layers], [
            m.mlp.down_proj for m in model.model.layers
        ]
    blocks = model.bert.encoder.layer
    return [[b.intermediate.dense] for b in blocks], [b.output.dense for b in blocks]


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA, MINILM], ids=lambda c: c.name)
@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_trainable_values_are_k_rows_of_each_ffn_input_projection(case, fraction):
    base = case.fresh()
    inputs, _ = _ffn(base, case)
    expected = 0
    for group in inputs:
        for layer in group:
            k = max(1, round(fraction * layer.out_features))
            expected += k * (layer.in_features + (layer.bias is not None))
    head = sum(p.numel() for p in base.classifier.parameters()) if case.classification else 0
    model = peft_methods.apply(base, {"method": "far", "fraction": fraction})
    assert FAR.num_adapter_parameters(model) == expected + head
    assert sum(isinstance(m, FARLinear) for m in model.modules()) == sum(len(g) for g in inputs)


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_frozen_ffn_weights_get_no_gradient_and_outputs_start_at_the_base(case):
    base = case.fresh()
    with torch.no_grad():
        expected = base(**_inputs(case)).logits
    model = peft_methods.apply(base, {"method": "far"})
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(case)).logits, expected, atol=1e-6, rtol=0)
    model.train()
    model(**case.batch()).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, FARLinear)]
    assert layers
    for layer in layers:
        assert layer.base_layer.weight.grad is None
        assert layer.far_weight.grad is not None and layer.far_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_prime_picks_the_units_with_the_largest_gradient(case):
    base = case.fresh()
    inputs, outputs = _ffn(base, case)
    chosen = [[3, 11, 20, 33, 47], [0, 7, 8, 30, 41]]  # k = round(0.1 * 48) = 5 per layer
    with torch.no_grad():
        for out_proj, units in zip(outputs, chosen):
            keep = torch.zeros(out_proj.in_features, dtype=torch.bool)
            keep[units] = True
            out_proj.weight[:, ~keep] = 0  # other units cannot affect the loss: zero gradient
    model = peft_methods.apply(base, {"method": "far", "fraction": 0.1})
    owned = FAR.trainable_parameter_names(model)
    FAR.prime(model, [case.batch(seed=s) for s in range(2)])

    for group, units in zip(inputs, chosen):
        for projection in group:
            layer = next(m for m in model.modules() if isinstance(m, FARLinear) and m.base_layer is projection)
            assert layer.far_rows.tolist() == units
            assert torch.equal(layer.far_weight, projection.weight[units])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # prime restores the mode it found


def test_without_prime_or_batches_the_first_units_train():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "far", "fraction": 0.25})
    FAR.prime(model, [])
    for layer in (m for m in model.modules() if isinstance(m, FARLinear)):
        assert layer.far_rows.tolist() == list(range(12))


def test_merge_writes_the_trained_rows_and_unmerge_restores_them():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "far"})
    FAR.prime(model, [TINY_BERT.batch()])
    randomize_adapter(model)
    layer = model.bert.encoder.layer[1].intermediate.dense
    original = layer.base_layer.weight.detach().clone()
    expected = original.clone()
    expected[layer.far_rows] = layer.far_weight.detach()
    peft_methods.merge(model)
    assert torch.equal(layer.base_layer.weight, expected)
    peft_methods.unmerge(model)
    assert torch.equal(layer.base_layer.weight, original)


def test_the_file_holds_the_selected_rows_and_their_trained_values(tmp_path):
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "far", "fraction": 0.25})
    FAR.prime(model, [TINY_LLAMA.batch()])
    randomize_adapter(model)
    state = peft_methods.adapter_state_dict(model)
    suffixes = {k.rsplit(".", 1)[-1] for k in state}
    assert suffixes == {"far_rows", "far_weight"}  # LLaMA projections have no bias
    rows = state["model.layers.0.mlp.gate_proj.far_rows"]
    assert rows.dtype == torch.int64 and torch.equal(rows, state["model.layers.0.mlp.up_proj.far_rows"])
    assert state["model.layers.0.mlp.gate_proj.far_weight"].shape == (12, 32)

    peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(TINY_LLAMA.fresh(), tmp_path / "a")
    for key, value in peft_methods.adapter_state_dict(reloaded).items():
        assert torch.equal(value, state[key]), key


def test_a_file_with_out_of_range_rows_is_refused():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "far"})
    state = dict(peft_methods.adapter_state_dict(model))
    state["bert.encoder.layer.0.intermediate.dense.far_rows"] = torch.tensor([0, 1, 2, 3, 99])
    with pytest.raises(ValueError, match="distinct rows"):
        FAR.load_adapter_state_dict(peft_methods.apply(TINY_BERT.fresh(), {"method": "far"}), state)


@pytest.mark.parametrize(
    "bad,field",
    [({"fraction": 0}, "fraction"), ({"fraction": 1.5}, "fraction"), ({"fraction": "most"}, "fraction"),
     ({"target_modules": []}, "target_modules")],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "far", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]
