"""Mixed-adapter batches: one forward over rows that use different adapters (of every servable
method) equals running each row alone with its adapter loaded the ordinary way."""

from __future__ import annotations

import pytest
import torch

import peft_methods
from peft_methods.adapter_files import read_adapter
from peft_methods.mixed_batch import AdapterBank, GenerationRequest, NotServable
import transformers

from tests.conftest import TINY_BERT, TINY_LLAMA, ModelCase, randomize_adapter


def _tiny_llama_classifier():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


TINY_LLAMA_CLS = ModelCase("tiny-llama-cls", _tiny_llama_classifier, 97, True)  # pools the last position

SERVABLE = ["lora", "bitfit", "bottleneck", "adamix", "prompt_tuning", "ipt", "far", "diff_pruning", "prefix_tuning"]
CONFIGS = {m: {"method": m} for m in SERVABLE} | {
    "lora-r2-all": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["*"]} ,
    "prompt-short": {"method": "prompt_tuning", "num_virtual_tokens": 3},
    "prefix-short": {"method": "prefix_tuning", "num_virtual_tokens": 2},
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
    return [torch.randint(5, case.vocab_size, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


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
    out = _bank(case, folders).forward_rows(rows, keys).logits
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


def test_mixed_generation_equals_generating_each_request_alone():
    case = TINY_LLAMA
    tmp = {}
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    for name in ("lora", "prompt_tuning", "bitfit"):
        model = peft_methods.apply(case.fresh(), {"method": name})
        randomize_adapter(model, scale=0.5)
        tmp[name] = peft_methods.save_adapter(model, folder / name)
    bank = _bank(case, tmp)
    prompts = _rows(case, 4)
    requests = [GenerationRequest(p, k, max_tokens=6) for p, k in zip(prompts, [None, "lora", "prompt_tuning", "bitfit"])]
    requests.append(GenerationRequest(prompts[0], "lora", max_tokens=6, temperature=0.8, top_p=0.9, seed=3))
    together = bank.generate(requests)
    alone = [bank.generate([r])[0] for r in requests]
    assert together == alone
    assert all(len(t) == 6 for t in together)
    assert len({tuple(t) for t in together[:4]}) > 1  # the adapters change what is generated
    # Greedy decoding with the cache matches greedy decoding by full forwards of the adapted model.
    model = peft_methods.load_adapter(case.fresh(), tmp["lora"]).eval()
    ids = list(prompts[1])
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert together[1] == ids[len(prompts[1]):]


def test_stop_callback_and_max_tokens_end_rows_independently():
    bank = AdapterBank(TINY_LLAMA.fresh(), capacity=1)
    seen = []
    out = bank.generate([GenerationRequest([5, 6, 7], max_tokens=5), GenerationRequest([8, 9], max_tokens=2)],
                        on_token=lambda row, tok: seen.append(row) or (row == 0 and len([r for r in seen if r == 0]) == 3))
    assert [len(o) for o in out] == [3, 2]


def test_methods_without_row_deltas_are_refused_by_name(tmp_path):
    model = peft_methods.apply(TINY_LLAMA.fresh(), {"method": "ia3"})  # the third-party example plugin
    folder = peft_methods.save_adapter(model, tmp_path / "p")
    config, state, _ = read_adapter(folder)
    bank = AdapterBank(TINY_LLAMA.fresh(), capacity=2)
    with pytest.raises(NotServable, match="ia3"):
        bank.load("p", config, state)
    assert "p" not in bank
