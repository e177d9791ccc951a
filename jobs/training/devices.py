"""Where a job's tensors live and in what precision, decided once per rank.

Every batch, label, metric and collective of the recipe goes through :class:`Placement`: batches
are moved to the rank's accelerator (pinned first on CUDA, so the copy overlaps compute), metric
sums are built on that device (NCCL only reduces device tensors), and the model's weights load in
the job's precision. The optimizer that goes with offloading is chosen here too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from jobs.base_models import DTYPES


def local_device(device: torch.device | None = None) -> torch.device:
    """This rank's device, made current: ``device`` when the launcher says (Ray Train's GPU for the
    rank), else ``cuda:<LOCAL_RANK>`` under DeepSpeed's CUDA accelerator, else ``cpu``."""
    if device is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        if accelerator.device_name() == "cpu":
            return torch.device("cpu")
        device = torch.device(accelerator.device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # zero.Init and NCCL use the current device
    return device


class Placement:
    """One rank's device and the job's compute dtype."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def for_job(cls, precision: str, device: torch.device | None = None) -> Placement:
        return cls(local_device(device), DTYPES[precision])

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host-side work that may run ahead of the step (a prefetch thread): pin for an async copy."""
        if self.device.type != "cuda":
            return batch
        return {k: v.pin_memory() for k, v in batch.items()}

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on this rank's device (a no-op for tensors already there)."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def zeros(self, n: int) -> torch.Tensor:
        """Accumulators for metric sums, on the device, in float64 (sums over many batches)."""
        return torch.zeros(n, dtype=torch.float64, device=self.device)


def all_sum(values: torch.Tensor | Iterable[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums over every rank (the values themselves when training alone): one collective
    on ``device`` and one transfer to the host."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64, device=device)
    t = t.to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def make_optimizer(method: Any, model: torch.nn.Module, named: dict[str, torch.nn.Parameter], training: Any, *,
                   offload: bool):
    """AdamW over ``named`` (the trainable parameters of ``model``, which has ``method`` applied), one
    parameter group per learning rate the method asks for (adapter: ``training.lr``, task head:
    ``training.head_lr``, and the method's own, see ``PeftMethod.optimizer_groups``); each group keeps its
    ``name``. Offloading the optimizer runs the step on the CPU, which DeepSpeed only accepts from its own
    CPU Adam (``zero_force_ds_cpu_optimizer``); that needs the ``cpu_adam`` op, pre-built in
    deploy/Dockerfile or compiled here on first use."""
    groups = [{**{k: v for k, v in g.items() if k != "names"}, "params": [named[n] for n in g["names"]]}
              for g in method.optimizer_groups(model, list(named), lr=training.lr, head_lr=training.head_lr,
                                               weight_decay=training.weight_decay)]
    if not offload:
        return torch.optim.AdamW(groups)
    check_cpu_adam()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True)


def check_cpu_adam() -> None:
    """Raise a clear error when DeepSpeed's ``cpu_adam`` op is neither pre-built nor buildable here."""
    if cpu_adam_prebuilt():
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    missing = [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool) is None]
    if missing or not builder.is_compatible(verbose=False):
        raise RuntimeError(
            "deepspeed.offload_optimizer needs DeepSpeed's cpu_adam op, which is not pre-built in this "
            "environment and cannot be compiled here ("
            + (f"missing {', '.join(missing)} on PATH" if missing else "the op builder reports it incompatible")
            + "). Install DeepSpeed with DS_BUILD_CPU_ADAM=1 (deploy/Dockerfile does), or add a C++ toolchain and "
            "ninja to the worker image, or turn offload_optimizer off."
        )


def cpu_adam_prebuilt() -> bool:
    import deepspeed.git_version_info as info

    return bool(getattr(info, "installed_ops", {}).get("cpu_adam"))


@contextmanager
def master_weights(named: list[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
    """Inside, each of ``named``'s parameters holds its full fp32 master value (the optimizer's
    high-precision copy under bf16/fp16 or ZeRO; gathered under ZeRO-3), so an adapter is saved at
    the precision it was trained in, never rounded to the bf16 the forward pass used. Collective:
    every rank enters it with the same parameters, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for _, p in named:
            full = safe_get_full_fp32_param(p)
            kept.append((p, p.data))
            p.data = (full if full is not None else p.data).detach().to(torch.float32)
        yield
    finally:
        for p, data in kept:
            p.data = data

