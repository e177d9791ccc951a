"""IA³: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638). Learned vectors rescale the outputs of chosen linear
layers, initialised to ones so training starts from the base model. Mergeable: the scale folds
into the layer's weight rows and bias.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peft_methods import MethodConfig, PeftMethod
from peft_methods.targeting import find_modules, name_matches, replace_module


class IA3Config(MethodConfig):
    method: Literal["ia3"] = Field(default="ia3", description="Selects IA³.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["key", "value", "k_proj", "v_proj"],
        min_length=1,
        description="Name patterns of the nn.Linear layers whose outputs are rescaled.",
    )


class ScaledLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.ia3_scale = nn.Parameter(torch.ones(base_layer.out_features, dtype=base_layer.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else out * self.ia3_scale

    @torch.no_grad()
    def rescale(self, factor: torch.Tensor) -> None:
        self.base_layer.weight.mul_(factor[:, None])
        if self.base_layer.bias is not None:
            self.base_layer.bias.mul_(factor)


class IA3(PeftMethod):
    name = "ia3"
    Config = IA3Config
    mergeable = True
    inference_overhead = "none when merged; unmerged, one elementwise multiply per adapted layer"
    paper = "Liu et al. 2022, arXiv:2205.05638"

    def _inject(self, model: nn.Module, config: IA3Config) -> None:
        # the default names both families' projections; keep the patterns this model has
        names = [n for n, _ in model.named_modules()]
        patterns = [p for p in config.target_modules if any(name_matches(n, p) for n in names)]
        for name, layer in find_modules(model, patterns or config.target_modules):
            replace_module(model, name, ScaledLinear(layer))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.endswith(".ia3_scale")

    def merge(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, ScaledLinear) and not m.merged:
                m.rescale(m.ia3_scale)
                m.merged = True

    def unmerge(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, ScaledLinear) and m.merged:
                m.rescale(1 / m.ia3_scale)
                m.merged = False
