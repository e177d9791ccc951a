"""Prefix tuning: parameter counts, folding the MLP, attention backends, and equality with HF PEFT."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import peft_methods
from peft_methods.prefix_tuning import KVLayout, Prefix, ProjectedPrefix
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter

METHOD = peft_methods.get_method("prefix_tuning")


def _inputs(case, **kw):
    return {k: v for k, v in case.batch(**kw).items() if k != "labels"}


def _head_size(model, case) -> int:
    return sum(p.numel() for p in model.classifier.parameters()) if case.classification else 0


def _kv_dim(config) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads * config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA, MINILM], ids=lambda c: c.name)
@pytest.mark.parametrize("n", [1, 5])
def test_parameter_count_is_tokens_times_layers_times_two_kv_dims(case, n):
    base = case.fresh()
    head, layers, kv = _head_size(base, case), base.config.num_hidden_layers, _kv_dim(base.config)
    model = peft_methods.apply(base, {"method": "prefix_tuning", "num_virtual_tokens": n, "prefix_projection": False})
    assert METHOD.num_adapter_parameters(model) == n * layers * 2 * kv + head


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_parameter_count_with_projection_is_embedding_plus_mlp(case):
    n, h = 5, 24
    base = case.fresh()
    head, kv = _head_size(base, case), _kv_dim(base.config)
    width = base.config.num_hidden_layers * 2 * kv
    model = peft_methods.apply(base, {"method": "prefix_tuning", "num_virtual_tokens": n, "prefix_projection": True,
                                      "encoder_hidden_size": h})
    assert METHOD.num_adapter_parameters(model) == n * kv + (kv * h + h) + (h * width + width) + head


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_hf_peft_loads_our_llama_adapter_and_gives_the_same_outputs(projection, tmp_path):
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prefix_tuning", "num_virtual_tokens": 4,
                                                    "prefix_projection": projection})
    randomize_adapter(model)
    batch = TINY_LLAMA.batch()
    with torch.no_grad():
        ours = model(**batch)
    peft_methods.save_adapter(model, tmp_path / "a")
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["token_dim"], cfg["num_attention_heads"], cfg["prefix_projection"]) == (
        "PREFIX_TUNING",
        16,
        2,
        False,
    )

    hf = PeftModel.from_pretrained(TINY_LLAMA.fresh(), tmp_path / "a").eval()
    with torch.no_grad():
        theirs = hf(**batch)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)


def _hf_bert(tmp_path):
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "prefix_tuning", "num_virtual_tokens": 4})
    randomize_adapter(model)
    peft_methods.save_adapter(model, tmp_path / "a")
    return model, PeftModel.from_pretrained(TINY_BERT.fresh(), tmp_path / "a").eval()


def test_hf_peft_loads_our_bert_adapter_into_the_same_prefix(tmp_path):
    """HF PEFT builds the same cache from our file as we do, and the classifier then gives our logits."""
    model, hf = _hf_bert(tmp_path)
    inputs = _inputs(TINY_BERT)
    mask = torch.cat([torch.ones(3, 4, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        ours = model(**inputs).logits
        assert torch.equal(hf.base_model.classifier.modules_to_save["default"].weight, model.classifier.weight)
        cache = hf.get_prompt(batch_size=3)  # what HF PEFT's forward would hand the backbone
        theirs = hf.base_model(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=cache).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="HF PEFT 0.21 looks for `past_key_values` in BertModel.forward's signature, "
    "renamed `cache` in transformers 5.x",
)
def test_hf_peft_forward_on_a_bert_classifier(tmp_path):
    model, hf = _hf_bert(tmp_path)
    inputs = _inputs(TINY_BERT)
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_folding_the_projection_preserves_outputs(case, tmp_path):
    model = peft_methods.apply(
        case.fresh(),
        {"method": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16},
    )
    randomize_adapter(model)
    inputs = _inputs(case)
    with torch.no_grad():
        expected = model(**inputs).logits
    peft_methods.save_adapter(model, tmp_path / "a")
    reloaded = peft_methods.load_adapter(case.fresh(), tmp_path / "a")
    assert isinstance(reloaded.peft_prefix, Prefix)  # plain prefixes: the MLP is gone
    width = KVLayout.of(reloaded.config).width
    assert METHOD.num_adapter_parameters(reloaded) == 3 * width + _head_size(reloaded, case)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["default", "projection"])
def test_the_prefix_trains_directly_by_default_and_through_the_papers_mlp_when_asked(projection):
    config = {"method": "prefix_tuning", **({"prefix_projection": True} if projection else {})}
    model = peft_methods.apply(TINY_LLAMA.fresh(), config)
    assert isinstance(model.peft_prefix, ProjectedPrefix if projection else Prefix)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = ("embedding", "w1", "b1", "w2", "b2") if projection else ("prefix",)
    assert trainable == {f"peft_prefix.{n}" for n in names}


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_the_initial_prefix_is_the_models_own_context_of_real_tokens(projection):
    """A prefix starts as the keys/values of random vocabulary tokens, so for a causal LM it acts
    exactly like having those tokens in front of the input; through the MLP too."""
    n = 4
    torch.manual_seed(5)
    context = torch.randint(TINY_LLAMA.vocab_size, (1, n))
    base, model = TINY_LLAMA.fresh(), TINY_LLAMA.fresh()  # fresh() seeds the RNG itself
    torch.manual_seed(5)
    model = peft_methods.apply(model, {"method": "prefix_tuning", "num_virtual_tokens": n,
                                       "prefix_projection": projection})
    ids = _inputs(TINY_LLAMA)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        reference = base(input_ids=torch.cat([context.expand(ids.shape[0], n), ids], dim=1)).logits[:, n:]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_eager_and_sdpa_attention_agree(case, tmp_path):
    model = peft_methods.apply(case.fresh(), {"method": "prefix_tuning", "num_virtual_tokens": 4})
    randomize_adapter(model)
    peft_methods.save_adapter(model, tmp_path / "a")
    inputs = _inputs(case)
    results = []
    for impl in ("eager", "sdpa"):
        base = case.fresh()
        base.set_attn_implementation(impl)
        with torch.no_grad():
            results.append(peft_methods.load_adapter(base, tmp_path / "a")(**inputs).logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_positional_arguments_and_explicit_position_ids_mean_the_same_as_the_defaults():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prefix_tuning", "num_virtual_tokens": 3})
    randomize_adapter(model)
    inputs = _inputs(TINY_LLAMA)
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(model(ids, inputs["attention_mask"]).logits, expected)
        implicit = model(input_ids=ids).logits
        explicit = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    torch.testing.assert_close(explicit, implicit, atol=1e-6, rtol=0)


def test_gradient_checkpointing_is_refused_rather_than_dropping_the_prefix():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prefix_tuning", "num_virtual_tokens": 3})
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**TINY_LLAMA.batch())


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"prefix_projection": "maybe"}, "prefix_projection"),
    ],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "prefix_tuning", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]
