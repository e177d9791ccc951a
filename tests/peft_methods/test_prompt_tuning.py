"""Prompt tuning: parameter counts, the input rewriting, text init, and equality with HF PEFT."""

from __future__ import annotations

import pydantic
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import peft_methods
from tests.conftest import MINILM, TINY_BERT, TINY_LLAMA, randomize_adapter


def _inputs(case, **kw):
    return {k: v for k, v in case.batch(**kw).items() if k != "labels"}


def _head_size(model, case) -> int:
    return sum(p.numel() for p in model.classifier.parameters()) if case.classification else 0


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA, MINILM], ids=lambda c: c.name)
@pytest.mark.parametrize("n", [1, 5])
def test_parameter_count_is_tokens_times_hidden(case, n):
    base = case.fresh()
    head = _head_size(base, case)
    model = peft_methods.apply(base, {"method": "prompt_tuning", "num_virtual_tokens": n})
    assert peft_methods.get_method("prompt_tuning").num_adapter_parameters(model) == n * base.config.hidden_size + head


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_hf_peft_loads_our_adapter_and_gives_the_same_outputs(case, tmp_path):
    n = 4
    model = peft_methods.apply(case.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": n})
    randomize_adapter(model)
    batch = case.batch()
    with torch.no_grad():
        ours = model(**batch)
    peft_methods.save_adapter(model, tmp_path / "a")
    head = {"base_model.classifier.weight", "base_model.classifier.bias"} if case.classification else set()
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == {"prompt_embeddings"} | head

    hf = PeftModel.from_pretrained(case.fresh(), tmp_path / "a").eval()
    with torch.no_grad():
        theirs = hf(**batch)
    # HF PEFT's causal-LM logits keep the virtual positions in front; ours are aligned with input_ids.
    their_logits = theirs.logits if case.classification else theirs.logits[:, n:]
    if not case.classification:
        assert ours.logits.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(ours.logits, their_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)


def test_text_init_copies_the_token_embeddings_repeated_to_length():
    base = MINILM.fresh()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base.config._name_or_path)("great movie", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    table = base.get_input_embeddings().weight.detach().clone()
    model = peft_methods.apply(
        base, {"method": "prompt_tuning", "num_virtual_tokens": 5, "init": "text", "init_text": "great movie"}
    )
    expected = table[torch.tensor([ids[0], ids[1], ids[0], ids[1], ids[0]])]
    assert torch.equal(model.peft_prompt.weight.detach(), expected)


def test_text_init_with_an_explicit_tokenizer_truncates_to_length():
    from transformers import AutoTokenizer

    from jobs.base_models import resolve_base_model

    folder = str(resolve_base_model("minilm"))
    base = MINILM.fresh()
    table = base.get_input_embeddings().weight.detach().clone()
    ids = AutoTokenizer.from_pretrained(folder)("a rather long sentence", add_special_tokens=False)["input_ids"]
    model = peft_methods.apply(base, {"method": "prompt_tuning", "num_virtual_tokens": 2, "init": "text",
                                      "init_text": "a rather long sentence", "tokenizer_path": folder})
    assert torch.equal(model.peft_prompt.weight.detach(), table[torch.tensor(ids[:2])])


def test_text_init_refuses_a_tokenizer_that_does_not_fit_the_model():
    from jobs.base_models import resolve_base_model

    with pytest.raises(ValueError, match="beyond the model's vocabulary"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "prompt_tuning", "init": "text", "init_text": "zebra",
                                               "tokenizer_path": str(resolve_base_model("minilm"))})
    with pytest.raises(ValueError, match="needs tokenizer_path"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "prompt_tuning", "init": "text", "init_text": "zebra"})


def test_random_init_is_at_the_scale_of_the_token_embeddings():
    base = MINILM.fresh()
    scale = base.get_input_embeddings().weight.detach().std()
    model = peft_methods.apply(base, {"method": "prompt_tuning", "num_virtual_tokens": 64, "init": "random"})
    assert 0.7 * scale < model.peft_prompt.weight.detach().std() < 1.3 * scale
    assert not _rows_of(model.peft_prompt.weight.detach(), base.get_input_embeddings().weight.detach())


def _rows_of(prompt: torch.Tensor, table: torch.Tensor) -> list[int] | None:
    """The token ids whose embeddings the prompt's rows are, or None if some row is no token's embedding."""
    ids = []
    for row in prompt:
        hits = (table == row).all(dim=1).nonzero().flatten().tolist()
        if not hits:
            return None
        ids.append(hits[0])
    return ids


def test_by_default_the_prompt_starts_as_embeddings_of_tokens_sampled_from_the_5000_most_common():
    """Lester et al.'s sampled-vocabulary init: each virtual token starts as a real token's embedding, drawn
    (by torch's RNG, which jobs seed) from the first 5,000 ids of the vocabulary."""
    base = MINILM.fresh()
    table = base.get_input_embeddings().weight.detach().clone()
    draws = []
    for seed in (0, 0, 1):
        model = MINILM.fresh() if draws else base  # fresh() seeds the RNG itself: seed after it
        torch.manual_seed(seed)
        model = peft_methods.apply(model, {"method": "prompt_tuning", "num_virtual_tokens": 50})
        draws.append(_rows_of(model.peft_prompt.weight.detach(), table))
    assert draws[0] is not None and len(draws[0]) == 50 and max(draws[0]) < 5000
    assert draws[0] == draws[1] != draws[2]  # seeded, and a new seed draws other tokens
    assert len(set(draws[0])) > 40  # sampled, not one token repeated

    tiny = [TINY_BERT.fresh(), TINY_BERT.fresh()]
    torch.manual_seed(0)  # the whole vocabulary, and a limit beyond the vocabulary's size is the vocabulary
    whole = peft_methods.apply(tiny[0], {"method": "prompt_tuning", "num_virtual_tokens": 64, "init_vocab_size": None})
    torch.manual_seed(0)
    capped = peft_methods.apply(tiny[1], {"method": "prompt_tuning", "num_virtual_tokens": 64,
                                          "init_vocab_size": 10**6})
    tiny_table = TINY_BERT.fresh().get_input_embeddings().weight.detach()
    assert _rows_of(whole.peft_prompt.weight.detach(), tiny_table) == _rows_of(capped.peft_prompt.weight.detach(),
                                                                               tiny_table)
    assert max(_rows_of(whole.peft_prompt.weight.detach(), tiny_table)) >= 50  # ids across the 101 of them


def test_positional_arguments_and_explicit_ids_mean_the_same_as_the_defaults():
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": 3})
    randomize_adapter(model)
    inputs = _inputs(TINY_BERT)
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(model(inputs["input_ids"], inputs["attention_mask"]).logits, expected)
        assert torch.equal(model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).logits, expected)

    llama = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": 3})
    ids = _inputs(TINY_LLAMA)["input_ids"]
    with torch.no_grad():
        implicit = llama(input_ids=ids).logits
        explicit = llama(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    torch.testing.assert_close(explicit, implicit, atol=1e-6, rtol=0)


def test_inputs_embeds_work_like_input_ids():
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": 3})
    inputs = _inputs(TINY_LLAMA)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        assert torch.equal(
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits, model(**inputs).logits
        )


def test_a_kv_cache_forward_is_refused():
    from transformers import DynamicCache

    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": 3})
    with pytest.raises(NotImplementedError, match="KV cache"):
        model(**_inputs(TINY_LLAMA), past_key_values=DynamicCache())


def test_adapter_config_is_hf_peft_prompt_tuning(tmp_path):
    import json

    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "prompt_tuning", "num_virtual_tokens": 7})
    peft_methods.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {
        k: cfg[k]
        for k in (
            "peft_type",
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_layers",
            "prompt_tuning_init",
            "inference_mode",
        )
    } == {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 7,
        "token_dim": 32,
        "num_transformer_submodules": 1,
        "num_layers": 2,
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
    }


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": "many"}, "num_virtual_tokens"),
        ({"init": "sample"}, "init"),
        ({"init_vocab_size": 0}, "init_vocab_size"),
        ({"init": "text"}, "init_text"),
        ({"init_text": "hello"}, "init_text"),
        ({"init": "text", "init_text": ""}, "init_text"),
        ({"tokenizer_path": ""}, "tokenizer_path"),
    ],
)
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(pydantic.ValidationError) as err:
        peft_methods.parse_config({"method": "prompt_tuning", **bad})
    assert [e["loc"][-1] for e in err.value.errors()] == [field]
