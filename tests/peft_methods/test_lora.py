"""LoRA: parameter counts, targeting, merge arithmetic, and equality with HF PEFT."""

from __future__ import annotations

import pydantic
import pytest
import torch
from peft import PeftModel

import peft_methods
from peft_methods.lora import LoRALinear
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter


def _linear_shapes(model, suffixes):
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]


@pytest.mark.parametrize(
    "case,targets",
    [(TINY_BERT, ("query", "value")), (TINY_LLAMA, ("q_proj", "v_proj")), (MINILM, ("query", "value"))],
    ids=lambda x: getattr(x, "name", None),
)
@pytest.mark.parametrize("r", [1, 4])
def test_parameter_count_is_r_times_din_plus_dout_per_target(case, targets, r):
    base = case.fresh()
    shapes = _linear_shapes(base, targets)
    head = sum(p.numel() for p in base.classifier.parameters()) if case.classification else 0
    model = peft_methods.apply(base, {"method": "lora", "r": r})
    assert peft_methods.get_method("lora").num_adapter_parameters(model) == sum(r * (i + o) for i, o in shapes) + head
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(shapes)


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA, MINILM], ids=lambda c: c.name)
def test_outputs_match_hf_peft_loading_our_adapter(case, tmp_path):
    model = peft_methods.apply(case.fresh(), {"method": "lora", "r": 4, "alpha": 8})
    randomize_adapter(model)
    batch = {k: v for k, v in case.batch().items() if k != "labels"}
    with torch.no_grad():
        ours = model(**batch).logits
    peft_methods.save_adapter(model, tmp_path / "a")
    hf = PeftModel.from_pretrained(case.fresh(), tmp_path / "a").eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    hf_lora = {n for n, _ in hf.named_parameters() if "lora_" in n}
    assert len(hf_lora) == sum(2 for m in model.modules() if isinstance(m, LoRALinear))


def test_all_attention_and_mlp_projections_of_a_llama_by_pattern():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "lora", "target_modules": ["*_proj"]})
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_pattern_with_a_layer_index_adapts_that_layer_only():
    model = peft_methods.apply(
        TINY_BERT.fresh(), {"method": "lora", "target_modules": ["layer.1.attention.self.query"]}
    )
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        "bert.encoder.layer.1.attention.self.query"
    ]


def test_a_pattern_that_matches_nothing_names_the_available_layers():
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no Linear.*'query'"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "target_modules": ["q_proj"]})


def test_a_non_linear_target_is_refused():
    with pytest.raises(ValueError, match="LayerNorm, not Linear"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "target_modules": ["attention.output.LayerNorm"]})


def test_unknown_family_without_targets_is_refused_clearly():
    model = TINY_BERT.fresh()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default LoRA targets for model family 'mystery'"):
        peft_methods.apply(model, {"method": "lora"})


def test_merge_adds_scaled_BA_to_the_weight_and_unmerge_restores_it():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "r": 2, "alpha": 6})
    randomize_adapter(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    original = layer.base_layer.weight.detach().clone()
    expected = original + 3.0 * layer.lora_B.weight @ layer.lora_A.weight
    peft_methods.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected)
    peft_methods.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)


def test_dropout_acts_only_while_training():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "dropout": 0.5})
    randomize_adapter(model, scale=1.0)
    batch = {k: v for k, v in TINY_BERT.batch().items() if k != "labels"}
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)
    model.train()
    torch.manual_seed(0)
    a = model(**batch).logits
    assert not torch.equal(a, model(**batch).logits)


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"r": "eight"}, "r"),
    ],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "lora", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]


def test_applying_twice_is_refused():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora"})
    with pytest.raises(ValueError, match="already has method 'lora'"):
        peft_methods.apply(model, {"method": "bitfit"})


def test_modules_to_save_must_exist_and_can_be_emptied():
    with pytest.raises(ValueError, match=r"modules_to_save \['clasifier'\] are not modules"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "modules_to_save": ["clasifier"]})
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora", "modules_to_save": []})
    assert not any(n.startswith("classifier.") for n in peft_methods.adapter_state_dict(model))


def test_a_wildcard_targets_every_linear_layer_but_the_head():
    base = TINY_BERT.fresh()
    linears = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")}
    model = peft_methods.apply(base, {"method": "lora", "target_modules": ["*"]})
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == linears
