"""Diff pruning: sparse artifact sizes, the L0 penalty, gates and their optimizer group, the fixed-mask
phase 2 (switch, training, saving, resuming), merge arithmetic, config checks."""

from __future__ import annotations

import math
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors.torch import load_file

import peft_methods
from peft_methods.adapter_files import WEIGHTS_FILE
from peft_methods.diff_pruning import BETA, GAMMA, ZETA, DiffLinear, dense_diff, deterministic_gate
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter, save_tiny_bert
from tests.jobs.test_recipe import losses, run_recipe, store_job

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


def test_gates_train_in_their_own_group_at_gate_lr_without_weight_decay():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "diff_pruning", "gate_lr": 0.3})
    names = sorted(DIFF.trainable_parameter_names(model))
    groups = {g["name"]: g for g in DIFF.optimizer_groups(model, names, lr=1e-4, head_lr=2e-3, weight_decay=0.01)}
    assert set(groups) == {"adapter", "gates", "head"}
    assert groups["gates"]["lr"] == 0.3 and groups["gates"]["weight_decay"] == 0.0
    assert groups["adapter"]["lr"] == 1e-4 and groups["adapter"]["weight_decay"] == 0.01
    assert groups["head"]["lr"] == 2e-3
    assert groups["gates"]["names"] == [n for n in names if n.endswith(".diff_log_alpha")]
    assert groups["adapter"]["names"] == [n for n in names if n.endswith(".diff_delta")]
    assert all(n.startswith("classifier.") for n in groups["head"]["names"])


def _train(model, steps, total, optimizer):
    """``steps`` optimizer steps of ``total`` as the recipe takes them: begin_step, then loss and penalty."""
    model.train()
    for step in steps:
        DIFF.begin_step(model, step, total)
        batch = TINY_BERT.batch(seed=step)
        _, objective = DIFF.training_loss(model, batch, lambda: model(**batch))
        objective.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _optimizer(model):
    names = sorted(DIFF.trainable_parameter_names(model))
    params = dict(model.named_parameters())
    groups = DIFF.optimizer_groups(model, names, lr=3e-2, head_lr=1e-2, weight_decay=0.01)
    return torch.optim.AdamW([{"params": [params[n] for n in g.pop("names")], **g} for g in groups])


def _phase2_model():
    config = {"method": "diff_pruning", "fix_mask_at": 0.5, "target_sparsity": 0.05, "l0_weight": 10.0}
    torch.manual_seed(0)
    return peft_methods.apply(TINY_BERT.fresh(), config)


def test_phase_two_fixes_the_projected_mask_at_its_step_and_trains_only_those_entries():
    model = _phase2_model()
    optimizer = _optimizer(model)
    _train(model, range(3), 6, optimizer)
    layers = _layers(model)
    assert not any(m.fixed for m in layers.values())
    assert DIFF.regularization_loss(model) is not None
    projected = {n: m.sparse_entries() for n, m in layers.items()}  # phase 1's eval-time projection
    with torch.no_grad():
        before = model(**_inputs(TINY_BERT)).logits
        with dense_diff(model):
            dense = model(**_inputs(TINY_BERT)).logits
        assert not torch.equal(dense, before), "dense_diff evaluated the projection"
        expected = {n: (m.diff_delta * deterministic_gate(m.diff_log_alpha)).flatten() for n, m in layers.items()}

    DIFF.begin_step(model, 3, 6)  # fix_mask_at 0.5 of 6 steps: the mask is fixed before step 3
    for name, layer in layers.items():
        assert layer.fixed and bool(layer.diff_fixed)
        kept = layer.diff_kept
        assert kept.numel() == layer.keep and torch.equal(kept, projected[name][0])
        top = expected[name].abs().topk(layer.keep).values
        assert torch.equal(expected[name][kept].abs().sort().values, top.sort().values)
    with torch.no_grad():  # the switch itself changes nothing the model computes
        assert torch.equal(model(**_inputs(TINY_BERT)).logits, before)
        at_switch = {n: m.pruned_diff().clone() for n, m in layers.items()}

    _train(model, range(3, 6), 6, optimizer)
    assert DIFF.regularization_loss(model) is None
    state = peft_methods.adapter_state_dict(model)
    moved = 0
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(layer.diff_kept, projected[name][0]), "the mask moved after the switch"
            diff = layer.pruned_diff()
            changed = (diff != at_switch[name]).flatten().nonzero().flatten()
            assert set(changed.tolist()) <= set(layer.diff_kept.tolist()), f"{name}: entries outside the mask"
            moved += changed.numel()
            assert torch.equal(state[name + ".diff_indices"], layer.diff_kept)
            assert torch.equal(state[name + ".diff_values"], diff.flatten()[layer.diff_kept])
            with dense_diff(model):  # in phase 2 the dense model is the masked one
                assert torch.equal(layer.gated_diff(), diff)
    assert moved > 0, "phase 2 trained nothing"
    # What is evaluated is what is saved, merged or served.
    with torch.no_grad():
        evaluated = model(**_inputs(TINY_BERT)).logits
        peft_methods.merge(model)
        torch.testing.assert_close(model(**_inputs(TINY_BERT)).logits, evaluated, atol=1e-5, rtol=0)


def test_phase_two_trains_every_kept_entry_even_where_its_gate_had_closed():
    model = _phase2_model()
    optimizer = _optimizer(model)
    _train(model, range(3), 6, optimizer)
    name, layer = next(iter(_layers(model).items()))
    with torch.no_grad():
        layer.diff_log_alpha.fill_(-10.0)  # the penalty closed every gate of this layer before the switch
    DIFF.begin_step(model, 3, 6)
    assert torch.count_nonzero(layer.pruned_diff()) == 0  # continuous: its gated diff was zero at the switch
    _train(model, range(3, 6), 6, optimizer)
    moved = torch.count_nonzero(layer.pruned_diff()).item()
    assert moved >= 0.9 * layer.keep, f"{name}: {moved} of {layer.keep} kept entries learnt in phase 2"


def test_a_checkpoint_after_the_switch_restores_the_mask_and_phase():
    model = _phase2_model()
    optimizer = _optimizer(model)
    _train(model, range(4), 6, optimizer)  # fixed before step 3
    # What a DeepSpeed checkpoint with exclude_frozen_parameters holds: trainable parameters and buffers.
    trainable = DIFF.trainable_parameter_names(model)
    frozen = {n for n, _ in model.named_parameters()} - trainable
    saved = {k: v.clone() for k, v in model.state_dict().items() if k not in frozen}
    with torch.no_grad():
        expected = model(**_inputs(TINY_BERT)).logits

    resumed = _phase2_model()
    resumed.load_state_dict(saved, strict=False)
    layers, originals = _layers(resumed), _layers(model)
    assert all(m.fixed for m in layers.values())
    with torch.no_grad():
        for layer in layers.values():  # what a mask re-derived now would keep instead
            layer.diff_delta.add_(torch.randn_like(layer.diff_delta))
    DIFF.begin_step(resumed, 4, 6)  # the first step after the resume must not fix the mask again
    for name, layer in layers.items():
        assert torch.equal(layer.diff_kept, originals[name].diff_kept)
        assert torch.equal(layer.diff_kept_value, originals[name].diff_kept_value)
        assert torch.equal(layer.diff_kept_delta, originals[name].diff_kept_delta)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.diff_delta.copy_(originals[name].diff_delta)
        assert torch.equal(resumed(**_inputs(TINY_BERT)).logits, expected)


def test_a_recipe_resumed_after_the_switch_continues_identically(tmp_path):
    base = save_tiny_bert(tmp_path / "tiny-bert")
    spec = {
        "name": "diff-phases", "base_model": str(base), "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 64},
        "method": {"method": "diff_pruning", "fix_mask_at": 0.5, "target_sparsity": 0.05},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 16, "max_length": 32,
                     "checkpoint_every_steps": 6, "eval_every_steps": 8},
    }
    job = store_job(tmp_path, spec)  # its checkpoint recorded in a real store: the resume is verified against it
    full = run_recipe(tmp_path, spec, store=job)  # 8 steps: the mask is fixed before step 4, the checkpoint at 6
    (step, _), = full["checkpoints"]
    resumed = run_recipe(tmp_path, spec, store=job)
    assert resumed["events"][0][1]["resumed"] and resumed["events"][0][1]["step"] == step == 6
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-4), step
    (first, _), = full["adapters"]
    (second, _), = resumed["adapters"]
    a = load_file(Path(first) / WEIGHTS_FILE)
    b = load_file(Path(second) / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".diff_indices"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
