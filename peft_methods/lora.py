"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

A frozen linear layer ``W`` gains a trainable low-rank update: ``h = W x + (alpha / r) * B A x``,
with ``A`` (r × d_in) Kaiming-initialised and ``B`` (d_out × r) zero, so training starts from the
base model's behaviour. ``B A`` can be folded into ``W`` (merge) for zero inference overhead.
Saved in HF PEFT's layout, so ``peft.PeftModel.from_pretrained`` loads our adapters unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.row_deltas import LowRank
from peft_methods.targeting import ATTENTION_QV, default_targets, find_modules, hf_task_type, replace_module


class LoRAConfig(MethodConfig):
    method: Literal["lora"] = Field(default="lora", description="Selects LoRA.")
    r: int = Field(default=8, gt=0, le=4096, description="Rank of the update B·A.")
    alpha: float = Field(default=16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input while training.")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Name patterns of the nn.Linear layers to adapt (see peft_methods.targeting). "
            "None = the attention query and value projections of the model's family."
        ),
    )


class LoRALinear(nn.Module):
    """``base_layer`` (frozen) plus a low-rank branch; parameter names follow HF PEFT's."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight.dtype` keeps working
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


class LoRA(PeftMethod):
    name = "lora"
    Config = LoRAConfig
    mergeable = True
    inference_overhead = "none when merged; unmerged, two rank-r matmuls per adapted layer"
    default_lr = 4e-3
    paper = "Hu et al. 2021, arXiv:2106.09685"

    def _inject(self, model: nn.Module, config: LoRAConfig) -> None:
        patterns = config.target_modules or default_targets(model, ATTENTION_QV, "LoRA targets")
        for name, layer in find_modules(model, patterns):
            replace_module(model, name, LoRALinear(layer, config.r, config.alpha, config.dropout))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def packing_problem(self, config: LoRAConfig) -> str | None:
        if config.dropout > 0:
            return "LoRA dropout > 0 draws masks on the LoRA branch that packed rows do not reproduce; set dropout 0"
        return None

    def row_deltas(self, base: nn.Module, config: LoRAConfig, state: dict[str, torch.Tensor]) -> list[LowRank]:
        scale = config.alpha / config.r
        return [LowRank(k[: -len(".lora_A.weight")], state[k], state[k.replace(".lora_A.", ".lora_B.")] * scale)
                for k in sorted(state) if k.endswith(".lora_A.weight")]

    def adapter_config(self, model: nn.Module, config: LoRAConfig) -> dict[str, Any]:
        """HF PEFT's LoraConfig fields; targets listed by full name so both tools pick the same layers."""
        return {
            "peft_type": "LORA",
            "task_type": hf_task_type(model),
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)),
            "modules_to_save": list(model.peftfleet_modules_to_save) or None,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
