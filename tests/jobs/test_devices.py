"""The optimizer a job gets: plain AdamW, or DeepSpeed's CPU Adam when the optimizer is offloaded."""

from __future__ import annotations

import pytest
import torch

import peft_methods
from jobs.spec import TrainingSpec
from jobs.training.devices import cpu_adam_prebuilt, make_optimizer
from tests.conftest import tiny_bert


def _lora_model():
    model = peft_methods.apply(tiny_bert(), {"method": "lora"})
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_without_offload_the_optimizer_is_adamw_with_the_adapter_and_the_head_at_their_own_rates():
    model, named = _lora_model()
    training = TrainingSpec(lr=0.1, head_lr=0.02, weight_decay=0.01)
    optimizer = make_optimizer(peft_methods.get_method("lora"), model, named, training, offload=False)
    assert type(optimizer) is torch.optim.AdamW
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"adapter", "head"}
    assert {id(p) for p in groups["adapter"]["params"]} == {id(p) for n, p in named.items() if ".lora_" in n}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for n, p in named.items() if n.startswith("classifier.")}
    assert (groups["adapter"]["lr"], groups["head"]["lr"]) == (0.1, 0.02)
    assert groups["adapter"]["weight_decay"] == groups["head"]["weight_decay"] == 0.01


@pytest.mark.skipif(cpu_adam_prebuilt(), reason="this DeepSpeed has cpu_adam pre-built: nothing to compile")
def test_offload_without_a_prebuilt_op_or_a_toolchain_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, no ninja
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match=r"cpu_adam op.*missing c\+\+, ninja.*DS_BUILD_CPU_ADAM=1"):
        model, named = _lora_model()
        make_optimizer(peft_methods.get_method("lora"), model, named, TrainingSpec(), offload=True)
