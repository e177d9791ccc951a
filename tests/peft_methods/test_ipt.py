"""Intrinsic prompt tuning: the subspace fit, training only z, and loading without the subspace."""

from __future__ import annotations

import shutil

import pydantic
import pytest
import torch
from peft import PeftModel

import peft_methods
from peft_methods.adapter_files import AdapterIntegrityError
from peft_methods.ipt import SUBSPACE_TENSORS, fit_subspace, load_subspace, save_subspace
from tests.conftest import TINY_BERT, TINY_LLAMA, randomize_adapter

N, HIDDEN = 3, 32  # TINY_BERT / TINY_LLAMA hidden size


def _low_rank_prompts(k: int, rank: int, seed: int = 0) -> torch.Tensor:
    """k task prompts that vary along `rank` directions around a common prompt."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(N * HIDDEN, generator=g)
    basis = torch.randn(rank, N * HIDDEN, generator=g)
    codes = torch.randn(k, rank, generator=g)
    return (centre + codes @ basis).reshape(k, N, HIDDEN) * 0.05


@pytest.fixture
def subspace(tmp_path):
    prompts = _low_rank_prompts(k=6, rank=2)
    tensors, init, stats = fit_subspace(prompts, intrinsic_dim=2, inner_dim=16, steps=1500, lr=1e-2, seed=0)
    folder = save_subspace(
        tmp_path / "subspace", tensors, init, num_virtual_tokens=N, hidden_size=HIDDEN, metadata={"note": "t"}
    )
    return folder, prompts, stats


def test_fitted_decoder_reproduces_the_source_prompts(subspace):
    folder, prompts, stats = subspace
    assert stats["reconstruction_relative_error"] < 0.05
    decoder, init = load_subspace(folder, HIDDEN)
    # The initial code decodes to a prompt near the middle of the sources, at their scale.
    start = decoder(init)
    assert start.shape == (N, HIDDEN)
    mean = prompts.mean(0)
    assert (start - mean).norm() < 0.5 * (prompts - mean).norm(dim=(1, 2)).max()


def test_fitting_needs_two_different_tasks_and_no_more_dimensions_than_tasks():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        fit_subspace(_low_rank_prompts(k=1, rank=1), intrinsic_dim=1, inner_dim=4, steps=1, lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="intrinsic_dim 4 exceeds the 3 source prompts"):
        fit_subspace(_low_rank_prompts(k=3, rank=2), intrinsic_dim=4, inner_dim=4, steps=1, lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="identical"):
        fit_subspace(
            _low_rank_prompts(k=1, rank=1).repeat(3, 1, 1), intrinsic_dim=1, inner_dim=4, steps=1, lr=1e-2, seed=0
        )


@pytest.mark.parametrize("case", [TINY_BERT, TINY_LLAMA], ids=lambda c: c.name)
def test_only_z_and_the_head_train_and_the_prompt_starts_at_the_decoded_init(case, subspace):
    folder = subspace[0]
    model = peft_methods.apply(case.fresh(), {"method": "ipt", "subspace": str(folder)})
    method = peft_methods.get_method("ipt")
    head = sum(p.numel() for p in model.classifier.parameters()) if case.classification else 0
    assert method.num_adapter_parameters(model) == 2 + head
    decoder, init = load_subspace(folder, HIDDEN)
    assert torch.equal(model.peft_prompt.prompt(), decoder(init))

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    decoder_before = model.peft_prompt.decoder.out_weight.clone()
    for step in range(3):
        model(**case.batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.peft_prompt.intrinsic.detach(), init)
    assert torch.equal(model.peft_prompt.decoder.out_weight, decoder_before)


def test_saved_adapter_loads_without_the_subspace_and_in_hf_peft(subspace, tmp_path):
    folder = subspace[0]
    case = TINY_LLAMA
    model = peft_methods.apply(case.fresh(), {"method": "ipt", "subspace": str(folder)})
    randomize_adapter(model)
    batch = case.batch()
    with torch.no_grad():
        expected = model(**batch).logits
    peft_methods.save_adapter(model, tmp_path / "a")
    shutil.rmtree(folder)  # loading needs the decoded prompt only

    reloaded = peft_methods.load_adapter(case.fresh(), tmp_path / "a").eval()
    assert reloaded.peftfleet_config.decoded
    assert torch.equal(reloaded.peft_prompt.intrinsic, model.peft_prompt.intrinsic.detach())
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        theirs = PeftModel.from_pretrained(case.fresh(), tmp_path / "a").eval()(**batch).logits[:, N:]
    torch.testing.assert_close(theirs, expected, atol=1e-6, rtol=0)


def test_random_subspace_is_reproducible_from_its_seed():
    prompts = [
        peft_methods.apply(TINY_BERT.fresh(), {"method": "ipt", "seed": s}).peft_prompt.prompt() for s in (0, 0, 1)
    ]
    assert prompts[0].shape == (20, HIDDEN)
    assert torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[0], prompts[2])


def test_subspace_problems_are_named(subspace):
    folder = subspace[0]
    with pytest.raises(ValueError, match="intrinsic_dim=5, but the subspace has 2"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "ipt", "subspace": str(folder), "intrinsic_dim": 5})
    with pytest.raises(ValueError, match="is not a folder"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "ipt", "subspace": "no-such-subspace"})
    with pytest.raises(ValueError, match="width 32"):
        load_subspace(folder, 64)
    with open(folder / SUBSPACE_TENSORS, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x01")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        peft_methods.apply(TINY_BERT.fresh(), {"method": "ipt", "subspace": str(folder)})


def test_decoded_form_needs_its_sizes():
    with pytest.raises(pydantic.ValidationError, match="decoded=True needs"):
        peft_methods.parse_config({"method": "ipt", "decoded": True})
