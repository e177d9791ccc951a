"""The optimizer a job gets: plain AdamW, or DeepSpeed's CPU Adam when the optimizer is offloaded."""

from __future__ import annotations

import pytest
import torch

from jobs.training.devices import cpu_adam_prebuilt, make_optimizer


def test_without_offload_the_optimizer_is_torch_adamw_over_exactly_the_given_parameters():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = make_optimizer(params, lr=0.1, weight_decay=0.01, offload=False)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["params"] == params and optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.skipif(cpu_adam_prebuilt(), reason="this DeepSpeed has cpu_adam pre-built: nothing to compile")
def test_offload_without_a_prebuilt_op_or_a_toolchain_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, no ninja
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match=r"cpu_adam op.*missing c\+\+, ninja.*DS_BUILD_CPU_ADAM=1"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=0.0, offload=True)
