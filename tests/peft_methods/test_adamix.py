"""AdaMix: expert counts, stochastic routing, consistency loss, and the averaged adapter it saves."""

from __future__ import annotations

import pydantic
import pytest
import torch

import peft_methods
from peft_methods.adamix import AdaMixLinear
from tests.conftest import TINY_BERT, TINY_LLAMA, randomize_adapter

CASES = [TINY_BERT, TINY_LLAMA]


def _inputs(case):
    return {k: v for k, v in case.batch().items() if k != "labels"}


def _layers(model) -> list[AdaMixLinear]:
    return [m for m in model.modules() if isinstance(m, AdaMixLinear)]


def _applied(case, **config):
    model = peft_methods.apply(case.fresh(), {"method": "adamix", **config})
    randomize_adapter(model)  # the up-projections start at zero: make the experts differ
    return model


def _per_adapter(model, reduction_factor=16) -> int:
    h = model.config.hidden_size
    b = max(1, h // reduction_factor)
    return 2 * h * b + b + h


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("num_experts", [1, 4])
def test_trains_num_experts_adapters_but_saves_one(case, placement, per_block, num_experts):
    base = case.fresh()
    head = sum(p.numel() for p in base.classifier.parameters()) if case.classification else 0
    model = peft_methods.apply(base, {"method": "adamix", "placement": placement, "num_experts": num_experts})
    sublayers = model.config.num_hidden_layers * per_block
    single = sublayers * _per_adapter(model)
    assert len(_layers(model)) == sublayers
    assert peft_methods.get_method("adamix").num_adapter_parameters(model) == num_experts * single + head
    assert sum(t.numel() for t in peft_methods.adapter_state_dict(model).values()) == single + head


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_saved_artifact_is_the_size_and_layout_of_one_bottleneck_adapter_unless_experts_are_kept(case, tmp_path):
    adamix = _applied(case)
    bottleneck = peft_methods.apply(case.fresh(), {"method": "bottleneck"})
    peft_methods.save_adapter(adamix, tmp_path / "adamix")
    peft_methods.save_adapter(bottleneck, tmp_path / "bottleneck")
    peft_methods.save_adapter(_applied(case, keep_experts=True), tmp_path / "kept")
    size = {d: peft_methods.read_manifest(tmp_path / d)["num_parameters"] for d in ("adamix", "bottleneck", "kept")}
    assert size["adamix"] == size["bottleneck"]
    averaged = peft_methods.adapter_state_dict(adamix)
    assert {k: v.shape for k, v in averaged.items()} == {
        k: v.shape for k, v in peft_methods.adapter_state_dict(bottleneck).items()
    }
    experts = sum(p.numel() for n, p in adamix.named_parameters() if ".adamix_experts." in n)
    assert size["kept"] == size["adamix"] + experts


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eval_equals_a_single_bottleneck_adapter_with_the_averaged_weights(case):
    adamix = _applied(case)
    bottleneck = peft_methods.apply(case.fresh(), {"method": "bottleneck"})
    # The averaged export uses a bottleneck adapter's tensor names, so it loads into one as is.
    peft_methods.get_method("bottleneck").load_adapter_state_dict(bottleneck, peft_methods.adapter_state_dict(adamix))
    with torch.no_grad():
        torch.testing.assert_close(
            adamix(**_inputs(case)).logits, bottleneck(**_inputs(case)).logits, atol=1e-6, rtol=0
        )


def test_averaged_weights_are_the_mean_of_the_experts():
    model = _applied(TINY_LLAMA)
    layer = model.model.layers[1].mlp.down_proj
    state = peft_methods.adapter_state_dict(model)
    experts = layer.adamix_experts
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.adapter_down.weight"], experts.down_weight.mean(0))
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.adapter_up.bias"], experts.up_bias.mean(0))


def test_training_forward_is_stochastic_and_eval_is_deterministic():
    base = TINY_LLAMA.fresh().train()  # no dropout in the tiny LLaMA: any randomness is the routing
    batch = _inputs(TINY_LLAMA)
    assert torch.equal(base(**batch).logits, base(**batch).logits)
    model = _applied(TINY_LLAMA)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
        model.train()
        torch.manual_seed(0)
        first = model(**batch).logits
        assert not torch.equal(first, model(**batch).logits)
        torch.manual_seed(0)
        assert torch.equal(first, model(**batch).logits)  # the routing follows torch's seed


def test_applying_to_an_eval_model_keeps_the_adapters_in_eval_mode():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "adamix"})
    assert all(not m.training for m in model.modules())


def test_each_training_forward_routes_through_one_down_and_one_up_expert():
    model = _applied(TINY_LLAMA, consistency_weight=0)
    model.train()
    model(**TINY_LLAMA.batch()).loss.backward()
    for layer in _layers(model):
        experts = layer.adamix_experts
        for p in (experts.down_weight, experts.up_weight, experts.up_bias):
            assert sum(bool(g.abs().sum() > 0) for g in p.grad) == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_consistency_loss_is_a_positive_scalar_in_training_then_cleared(case):
    model = _applied(case)
    method = peft_methods.get_method("adamix")
    model.train()
    loss = model(**case.batch()).loss
    extra = method.regularization_loss(model)
    assert extra.dim() == 0 and extra.item() > 0 and extra.requires_grad
    assert method.regularization_loss(model) is None  # each forward's term counts once
    (loss + extra).backward()
    model.eval()
    with torch.no_grad():
        model(**_inputs(case))
    assert method.regularization_loss(model) is None


def test_consistency_loss_scales_with_its_weight_and_can_be_switched_off():
    method = peft_methods.get_method("adamix")
    batch = _inputs(TINY_LLAMA)
    values = {}
    for weight in (0.0, 1.0, 2.5):
        model = _applied(TINY_LLAMA, consistency_weight=weight).train()
        torch.manual_seed(3)
        model(**batch)
        values[weight] = method.regularization_loss(model)
    assert values[0.0] is None
    torch.testing.assert_close(values[2.5], 2.5 * values[1.0])


def test_consistency_gradient_reaches_the_experts_of_the_second_route():
    model = _applied(TINY_LLAMA).train()
    method = peft_methods.get_method("adamix")
    model(**_inputs(TINY_LLAMA))
    method.regularization_loss(model).backward()
    for layer in _layers(model):  # two routes through distinct experts
        assert sum(bool(g.abs().sum() > 0) for g in layer.adamix_experts.up_weight.grad) == 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_reloaded_model_is_the_averaged_adapter_in_eval_and_in_training(case, tmp_path):
    model = _applied(case)
    batch = _inputs(case)
    with torch.no_grad():
        expected = model(**batch).logits
    peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(case.fresh(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        for layer in _layers(reloaded):  # every expert now is the average: routing no longer matters
            assert all(torch.equal(layer.adamix_experts.down_weight[0], w) for w in layer.adamix_experts.down_weight)
        if not case.classification:  # no dropout: a training forward equals the eval one
            reloaded.train()
            torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-6, rtol=0)
            assert peft_methods.get_method("adamix").regularization_loss(reloaded).item() == 0


def test_kept_experts_reload_exactly(tmp_path):
    model = _applied(TINY_LLAMA, keep_experts=True)
    peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(TINY_LLAMA.fresh(), tmp_path / "a")
    original = dict(model.named_parameters())
    for n, p in reloaded.named_parameters():
        if ".adamix_experts." in n:
            assert torch.equal(p, original[n])


def test_loading_mismatched_tensors_is_refused():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "adamix"})
    state = dict(peft_methods.adapter_state_dict(model))
    method = peft_methods.get_method("adamix")
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        method.load_adapter_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="has shape"):
        method.load_adapter_state_dict(model, {**state, key: torch.zeros(3)})


def test_cannot_be_merged_into_the_base():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "adamix"})
    with pytest.raises(NotImplementedError):
        peft_methods.merge(model)


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": -1}, "num_experts"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"nonlinearity": "swish"}, "nonlinearity"),
        ({"consistency_weight": -1}, "consistency_weight"),
        ({"placement": "everywhere"}, "placement"),
        ({"keep_experts": "sometimes"}, "keep_experts"),
    ],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "adamix", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]
