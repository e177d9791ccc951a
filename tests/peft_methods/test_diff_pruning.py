"""Diff pruning: sparse artifact sizes, the L0 penalty, gates, merge arithmetic, config checks."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

import peft_methods
from peft_methods.adapter_files import WEIGHTS_FILE
from peft_methods.diff_pruning import BETA, GAMMA, ZETA, DiffLinear
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter

DIFF = peft_methods.get_method("diff_pruning")


def _inputs(case):
    return {k: v for k, v in case.batch().items() if k != "labels"}


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DiffLinear)}


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
@pytest.mark.parametrize("sparsity", [0.005, 0.05])
def test_saved_entries_per_weight_are_the_target_fraction(case, sparsity):
    base = case.fresh()
    linears = {n: m.weight.numel() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n not in ("classifier", "lm_head", "bert.pooler.dense")}
    model = peft_methods.apply(base, {"method": "diff_pruning", "target_sparsity": sparsity})
    randomize_adapter(model)
    assert set(_layers(model)) == set(linears)  # every block linear by default
    head = sum(p.numel() for p in model.classifier.parameters()) if case.classification else 0
    assert DIFF.num_adapter_parameters(model) == 2 * sum(linears.values()) + head  # delta and log_alpha

    state = peft_methods.adapter_state_dict(model)
    for name, numel in linears.items():
        indices, values = state[name + ".diff_indices"], state[name + ".diff_values"]
        assert indices.dtype == torch.int64
        assert indices.numel() == values.numel() == max(1, round(sparsity * numel))
        assert torch.count_nonzero(values) == values.numel()


def test_a_fresh_adapter_leaves_eval_outputs_exactly_unchanged():
    base = TINY_BERT.fresh()
    with torch.no_grad():
        expected = base(**_inputs(TINY_BERT)).logits
        model = peft_methods.apply(base, {"method": "diff_pruning"})
        assert torch.equal(model(**_inputs(TINY_BERT)).logits, expected)


def test_gates_are_random_while_training_and_deterministic_in_eval():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning", "init_log_alpha": 0.0})
    randomize_adapter(model, scale=1.0)
    with torch.no_grad():
        assert torch.equal(model(**_inputs(TINY_BERT)).logits, model(**_inputs(TINY_BERT)).logits)
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(**_inputs(TINY_BERT)).logits, model(**_inputs(TINY_BERT)).logits)


def test_regularization_is_the_weighted_expected_fraction_of_open_gates_and_shrinks_with_log_alpha():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning", "l0_weight": 1e-3})
    model.train()

    def penalty():
        model(**TINY_BERT.batch())
        return DIFF.regularization_loss(model)

    first = penalty()
    assert first.dim() == 0 and first.item() > 0
    expected = sum(
        torch.sigmoid(m.diff_log_alpha - BETA * math.log(-GAMMA / ZETA)).sum() for m in _layers(model).values()
    )
    gated = sum(m.diff_log_alpha.numel() for m in _layers(model).values())
    torch.testing.assert_close(first, 1e-3 * expected / gated)
    first.backward()
    assert all(m.diff_log_alpha.grad is not None and (m.diff_log_alpha.grad > 0).all() for m in _layers(model).values())
    with torch.no_grad():
        for m in _layers(model).values():
            m.diff_log_alpha.sub_(1.0)
    assert penalty().item() < first.item()
    # Without a preceding training forward it is computed from the parameters directly.
    torch.testing.assert_close(DIFF.regularization_loss(model), penalty())


def test_the_saved_file_is_sparse(tmp_path):
    model = peft_methods.apply(MINILM.fresh(), {"method": "diff_pruning", "modules_to_save": []})
    randomize_adapter(model)
    dense_bytes = sum(m.diff_delta.numel() * 4 for m in _layers(model).values())
    folder = peft_methods.save_adapter(model, tmp_path / "a")
    assert (folder / WEIGHTS_FILE).stat().st_size < 0.02 * dense_bytes  # 0.5% of entries × (8 + 4) bytes


def test_merge_adds_exactly_the_saved_sparse_diff_and_unmerge_removes_it():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "diff_pruning", "target_sparsity": 0.05})
    randomize_adapter(model)
    state = peft_methods.adapter_state_dict(model)
    name = "model.layers.1.mlp.down_proj"
    weight = _layers(model)[name].base_layer.weight
    original = weight.detach().clone()
    expected = original.clone().view(-1)
    expected[state[name + ".diff_indices"]] += state[name + ".diff_values"]
    peft_methods.merge(model)
    changed = (weight != original).flatten().nonzero().flatten()
    assert torch.equal(weight.view(-1), expected)
    assert set(changed.tolist()) <= set(state[name + ".diff_indices"].tolist())
    peft_methods.unmerge(model)
    torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)


def test_loading_pins_the_gates_to_the_saved_entries(tmp_path):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning"})
    randomize_adapter(model)
    state = peft_methods.adapter_state_dict(model)
    peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(TINY_BERT.fresh(), tmp_path / "a")
    for name, layer in _layers(reloaded).items():
        indices = state[name + ".diff_indices"]
        assert torch.count_nonzero(layer.diff_delta) == indices.numel()
        assert (layer.diff_log_alpha.view(-1)[indices] > 0).all()
        assert (layer.diff_log_alpha > 0).sum() == indices.numel()
    for key, value in peft_methods.adapter_state_dict(reloaded).items():
        assert torch.equal(value, state[key]), key


def test_a_file_with_the_wrong_number_of_entries_is_refused():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning"})
    state = dict(peft_methods.adapter_state_dict(model))
    key = "bert.encoder.layer.0.attention.self.query.diff_indices"
    state[key] = state[key][:-1]
    with pytest.raises(ValueError, match="needs 5 int64 indices"):
        DIFF.load_adapter_state_dict(peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning"}), state)


@pytest.mark.parametrize(
    "bad,field",
    [({"target_sparsity": 1.5}, "target_sparsity"), ({"target_sparsity": 0}, "target_sparsity"),
     ({"l0_weight": -1}, "l0_weight"), ({"l0_weight": float("inf")}, "l0_weight"),
     ({"init_log_alpha": 50}, "init_log_alpha"), ({"target_modules": []}, "target_modules")],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "diff_pruning", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]
