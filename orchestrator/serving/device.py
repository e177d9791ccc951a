"""Where a serving replica runs: the device and the dtype the base model is loaded in.

``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``auto`` means CUDA when the replica has a
GPU (it reserved one, and torch sees it), else the CPU. ``dtype`` is ``auto``, ``fp32``, ``bf16`` or
``fp16``. ``auto`` means bf16 on a CUDA device that supports it, else fp32.

The base loads in that dtype straight onto that device, with no fp32 copy on the host first. The
adapter bank then keeps every adapter's tensors on the base's device, in its dtype
(:mod:`peft_methods.adapter_bank` casts the fp32 files on load). Asking for CUDA where there is
none is a :class:`DeviceUnavailable` error when the replica starts, or earlier where that can be
known (:func:`check_placement`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from jobs.base_models import DTYPES

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceUnavailable(ValueError):
    """The device or dtype asked for does not exist where the replica runs (CUDA on a CPU-only machine)."""


def check_device(device: str) -> str:
    """``device`` if it is one of auto, cpu, cuda, cuda:N; else a ValueError naming the choices."""
    match = _DEVICE.match(str(device))
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"device {device!r}: expected {DEVICE_CHOICES}")
    return str(device)


def check_dtype(dtype: str) -> str:
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return dtype


def check_placement(device: str, gpus_per_replica: float) -> None:
    """Refuse, before anything starts, a CUDA device that a replica would not have reserved: a Ray
    replica may use only the GPUs it reserves, and sees them as cuda:0, cuda:1, ..."""
    check_device(device)
    if not device.startswith("cuda"):
        return
    if gpus_per_replica <= 0:
        raise ValueError(f"device {device!r} needs a GPU per replica, but gpus_per_replica is {gpus_per_replica:g}; "
                         "reserve one (--gpus-per-replica 1) or serve on device 'cpu'")
    index = int(device.partition(":")[2] or 0)
    if index >= math.ceil(gpus_per_replica):
        raise ValueError(f"device {device!r}: a replica that reserves {gpus_per_replica:g} GPU(s) sees "
                         f"cuda:0..cuda:{math.ceil(gpus_per_replica) - 1} only")


def resolve_device(device: str, *, has_gpu: bool = True) -> torch.device:
    """The torch device for ``device``. ``auto`` is CUDA when ``has_gpu`` (in a replica: it reserved
    a GPU) and torch sees one, else the CPU; ``cuda`` without a visible CUDA device raises
    :class:`DeviceUnavailable`."""
    device = check_device(device)
    if device == "auto":
        return _cuda(None) if has_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceUnavailable(
            f"device {device!r} was asked for, but no CUDA device is visible here (torch {torch.__version__}, {build}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); serve with device 'cpu' or 'auto', "
            "or on a machine with a GPU")
    index = int(device.partition(":")[2] or 0) if ":" in device else None
    if index is not None and index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA "
                                "device(s) are visible here")
    return _cuda(index)


def _cuda(index: int | None) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device``: ``auto`` is bf16 on a CUDA device that supports it,
    else fp32 (never fp16 unasked: it can overflow where bf16 and fp32 do not)."""
    dtype = check_dtype(dtype)
    cuda = device.type == "cuda"
    if dtype == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(f"dtype 'bf16' was asked for, but {torch.cuda.get_device_name(device)} does not "
                                "support it; use fp16 or fp32")
    return DTYPES[dtype]


def load_base(ref: str, task: str, *, device: torch.device, dtype: torch.dtype, num_labels: int | None = None,
              home: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for ``task``, the weights loaded in ``dtype`` directly onto ``device``
    (:func:`jobs.base_models.load_base_model`, as jobs load it)."""
    from jobs.base_models import load_base_model

    model, tokenizer = load_base_model(ref, task, num_labels=num_labels, home=home, dtype=dtype, device=device)
    return model.eval(), tokenizer
