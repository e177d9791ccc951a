"""Every installed method, ours and third-party alike, through the same checks on every model."""

from __future__ import annotations

import pytest
import torch

import peft_methods
from tests.conftest import MODEL_CASES, TINY_LLAMA, randomize_adapter

METHODS = peft_methods.list_methods()
# head_only trains a task head and nothing else; a causal LM has none (its test below says so)
CASES = [pytest.param(m, c, id=f"{m}-{c.name}") for m in METHODS for c in MODEL_CASES
         if c.classification or m != "head_only"]


def applied(method: str, case):
    model = case.fresh()
    return peft_methods.apply(model, peft_methods.get_method(method).Config())


def outputs(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method,case", CASES)
def test_only_the_methods_parameters_train(method, case):
    model = applied(method, case)
    owned = peft_methods.get_method(method).trainable_parameter_names(model)
    assert owned, "the method owns no parameters"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in owned}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in owned}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps = 1 if case.name in ("minilm", "smollm2") else 3  # a step of a pretrained base costs seconds on a CPU
    for step in range(steps):
        loss = model(**case.batch(seed=step)).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is None) == (n not in owned), f"gradient flow wrong for {n}"
        optimizer.step()
        optimizer.zero_grad()

    after = dict(model.named_parameters())
    for n, before in frozen_before.items():
        assert torch.equal(after[n], before), f"frozen parameter {n} changed"
    changed = [n for n, before in adapter_before.items() if not torch.equal(after[n], before)]
    assert changed, f"no adapter parameter changed after {steps} optimizer step(s)"


@pytest.mark.parametrize("method,case", CASES)
def test_save_then_load_into_a_fresh_base_reproduces_outputs(method, case, tmp_path):
    model = applied(method, case)
    randomize_adapter(model)
    batch = case.batch()
    expected = outputs(model, batch)
    assert not torch.equal(expected, outputs(case.fresh(), batch)), "adapter made no difference"

    peft_methods.save_adapter(model, tmp_path / "adapter", metadata={"note": "suite"})
    reloaded = peft_methods.load_adapter(case.fresh(), tmp_path / "adapter")
    assert torch.equal(outputs(reloaded.eval(), batch), expected)
    assert peft_methods.read_manifest(tmp_path / "adapter")["metadata"] == {"note": "suite"}


@pytest.mark.parametrize("method,case", CASES)
def test_merge_matches_unmerged_outputs(method, case):
    model = applied(method, case)
    randomize_adapter(model)
    batch = case.batch()
    unmerged = outputs(model, batch)
    if not peft_methods.get_method(method).mergeable:
        with pytest.raises(NotImplementedError):
            peft_methods.merge(model)
        return
    # 1e-5 relative to the largest output: fp32 rounding grows with depth (30 layers in SmolLM2)
    atol = 1e-5 * max(1.0, unmerged.abs().max().item())
    peft_methods.merge(model)
    torch.testing.assert_close(outputs(model, batch), unmerged, atol=atol, rtol=0)
    peft_methods.unmerge(model)
    torch.testing.assert_close(outputs(model, batch), unmerged, atol=atol, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_field_is_rejected_with_its_name(method):
    with pytest.raises(Exception) as err:
        peft_methods.parse_config({"method": method, "no_such_field": 1})
    assert "no_such_field" in str(err.value)
    assert "Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_declares_its_contract(method):
    impl = peft_methods.get_method(method)
    assert impl.inference_overhead and impl.inference_overhead != "unknown"
    assert impl.paper
    assert impl.Config().method == method


def test_head_only_refuses_a_model_without_a_task_head():
    with pytest.raises(ValueError, match="head_only: LlamaForCausalLM has no task head"):
        applied("head_only", TINY_LLAMA)
