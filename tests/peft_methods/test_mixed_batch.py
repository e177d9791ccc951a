"""Mixed-adapter batches: one forward over rows that use different adapters (of every servable
method) equals running each row alone with its adapter loaded the ordinary way."""

from __future__ import annotations

import pytest
import torch
import transformers

import peft_methods
from peft_methods.adapter_bank import AdapterBank, NotServable
from peft_methods.adapter_files import read_adapter
from peft_methods.api import PeftMethod
from peft_methods.mixed_module import MixedModule
from peftfleet_example_plugin.ia3 import IA3
from tests.conftest import TINY_BERT, TINY_LLAMA, ModelCase, randomize_adapter


def _tiny_llama_classifier():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


TINY_LLAMA_CLS = ModelCase("tiny-llama-cls", _tiny_llama_classifier, 97, True)  # pools the last position

SERVABLE = ["lora", "bitfit", "bottleneck", "adamix", "prompt_tuning", "ipt", "far", "diff_pruning", "prefix_tuning"]
CONFIGS = {m: {"method": m} for m in SERVABLE} | {
    "lora-r2-all": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["*"]},
    "prompt-short": {"method": "prompt_tuning", "num_virtual_tokens": 3},
    "prefix-short": {"method": "prefix_tuning", "num_virtual_tokens": 2},
    "bottleneck-pfeiffer": {"method": "bottleneck", "placement": "pfeiffer"},  # norms of its own, beside bottleneck's
}


def _targets_all_linears(case, config):
    if config.get("target_modules") == ["*"]:
        return {**config, "target_modules": ["query", "key", "value", "dense"] if case is TINY_BERT else ["*_proj"]}
    return config


@pytest.fixture(params=[TINY_BERT, TINY_LLAMA, TINY_LLAMA_CLS], ids=lambda c: c.name)
def adapters(request, tmp_path):
    case = request.param
    folders = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = peft_methods.apply(case.fresh(), _targets_all_linears(case, config))
        torch.manual_seed(i)
        randomize_adapter(model, scale=0.2)
        folders[name] = peft_methods.save_adapter(model, tmp_path / name)
    return case, folders


def _rows(case, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        rows.append(torch.randint(5, case.vocab_size, (length,), generator=g).tolist())
    return rows


def _alone(case, folder, ids) -> torch.Tensor:
    model = case.fresh() if folder is None else peft_methods.load_adapter(case.fresh(), folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]


def _bank(case, folders, capacity=16) -> AdapterBank:
    bank = AdapterBank(case.fresh(), capacity=capacity)
    for name, folder in folders.items():
        config, state, _ = read_adapter(folder)
        bank.load(name, config, state)
    return bank


def test_one_forward_over_rows_of_every_method_equals_each_row_alone(adapters):
    case, folders = adapters
    keys = [None, *folders, None, "lora"]  # the base, every adapter, repeats
    rows = _rows(case, len(keys))
    bank = _bank(case, folders)
    norms = [m for m in bank.model.modules() if isinstance(m, MixedModule)
             and sum(type(d).__name__ == "OwnParameters" for ds in m.grouped.values() for d in ds) == 2]
    assert norms  # both bottleneck adapters' trained norms are served, each on its own rows
    out = bank.forward_rows(rows, keys).logits
    for i, (ids, key) in enumerate(zip(rows, keys)):
        expected = _alone(case, folders.get(key), ids)
        if case.classification:
            got = out[i, : expected.shape[-1]]
            assert torch.isinf(out[i, expected.shape[-1]:]).all()  # padding of wider heads
        else:
            got = out[i, -len(ids):]  # left padding: the row's own tokens are last
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=f"row {i} ({key})")


def test_rows_without_an_adapter_see_the_plain_base_even_after_evictions(adapters):
    case, folders = adapters
    bank = _bank(case, {k: folders[k] for k in ("lora", "bitfit")}, capacity=2)
    config, state, _ = read_adapter(folders["bottleneck"])
    assert bank.load("bottleneck", config, state) == ["lora"]  # least recently used goes
    assert "lora" not in bank and "bottleneck" in bank
    bank.forward_rows([[7, 8, 9]], ["bitfit"])  # bitfit is now the most recent
    config, state, _ = read_adapter(folders["lora"])
    assert bank.load("lora", config, state) == ["bottleneck"]
    rows = _rows(case, 3)
    out = bank.forward_rows(rows, [None, "lora", "bitfit"]).logits
    for i, key in enumerate([None, "lora", "bitfit"]):
        expected = _alone(case, folders.get(key), rows[i])
        got = out[i, : expected.shape[-1]] if case.classification else out[i, -len(rows[i]):]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_decoding_with_the_cache_equals_full_forwards_of_each_adapted_model(tmp_path):
    """Greedy decoding through ``bank.decode`` (prompts, prefixes and module deltas in one batch, one
    KV cache) picks the tokens each adapted model picks by full forwards of its whole sequence."""
    case, folder = TINY_LLAMA, {}
    for i, name in enumerate(("lora", "prompt_tuning", "bitfit", "prefix_tuning", "bottleneck")):
        model = peft_methods.apply(case.fresh(), {"method": name})
        torch.manual_seed(i)
        randomize_adapter(model, scale=0.5)
        folder[name] = peft_methods.save_adapter(model, tmp_path / name)
    keys = [None, *folder, "lora"]
    prompts = _rows(case, len(keys))
    bank, steps = _bank(case, folder), 6
    got = [[] for _ in keys]
    with bank.decode(prompts, keys) as batch:
        logits = batch.logits
        for _ in range(steps):
            ids = logits.argmax(-1).tolist()
            for row, token in zip(got, ids):
                row.append(token)
            logits = batch.step(ids)
    assert len({tuple(g) for g in got}) > 1  # the adapters change what is generated
    for prompt, key, tokens in zip(prompts, keys, got):
        model = case.fresh() if key is None else peft_methods.load_adapter(case.fresh(), folder[key]).eval()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert tokens == ids[len(prompt):], key
    assert bank.router.slots is None  # the rows' adapters are released when the block ends


@pytest.mark.parametrize("case", [TINY_LLAMA, TINY_BERT], ids=lambda c: c.name)
def test_a_plugin_method_serves_with_its_own_delta_kinds_beside_lora(case, tmp_path):
    """IA³ (the third-party example plugin) brings its own RowDelta kinds: output scales on keys and
    values, an input scale on the feed-forward's second layer. Nothing in the bank knows them."""
    ff = "down_proj" if case is TINY_LLAMA else "layer.[0-9].output.dense"
    configs = {"ia3": {"method": "ia3", "feedforward_modules": [ff]}, "lora": {"method": "lora"}}
    folders = {}
    for i, (name, config) in enumerate(configs.items()):
        model = peft_methods.apply(case.fresh(), config)
        torch.manual_seed(i)
        randomize_adapter(model, scale=0.3)
        folders[name] = peft_methods.save_adapter(model, tmp_path / name)
    bank = _bank(case, folders)
    grouped = {type(d).__name__ for m in bank.model.modules() if isinstance(m, MixedModule)
               for deltas in m.grouped.values() for d in deltas}
    assert grouped == {"OutputScale", "InputScale"}  # the plugin's own kinds, both in play
    keys = ["ia3", "lora", None, "ia3"]
    rows = _rows(case, len(keys))
    out = bank.forward_rows(rows, keys).logits
    for i, (ids, key) in enumerate(zip(rows, keys)):
        expected = _alone(case, folders.get(key), ids)
        got = out[i, : expected.shape[-1]] if case.classification else out[i, -len(ids):]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=f"row {i} ({key})")
    assert not torch.allclose(_alone(case, folders["ia3"], rows[0]), _alone(case, None, rows[0]))


def test_methods_without_row_deltas_are_refused_by_name(tmp_path, monkeypatch):
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "ia3"})
    folder = peft_methods.save_adapter(model, tmp_path / "p")
    config, state, _ = read_adapter(folder)
    monkeypatch.setattr(IA3, "row_deltas", PeftMethod.row_deltas)  # as a method that never described its deltas
    bank = AdapterBank(TINY_LLAMA.fresh(), capacity=2)
    with pytest.raises(NotServable, match="ia3"):
        bank.load("p", config, state)
    assert "p" not in bank
