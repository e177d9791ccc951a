"""IA³: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638). Learned vectors rescale the outputs of chosen linear
layers (the paper's keys and values) and, optionally, the inputs of others (the paper's
feed-forward vector, on the second feed-forward layer's input). Initialised to ones, so training
starts from the base model. Mergeable: an output scale folds into the layer's weight rows and
bias, an input scale into its weight columns.

It serves in mixed batches with delta kinds of its own (:class:`OutputScale`, :class:`InputScale`):
peftfleet's serving code knows nothing about IA³.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peft_methods import MethodConfig, PeftMethod
from peft_methods.row_deltas import RowDelta
from peft_methods.targeting import find_modules, name_matches, replace_module


class IA3Config(MethodConfig):
    method: Literal["ia3"] = Field(default="ia3", description="Selects IA³.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["key", "value", "k_proj", "v_proj"],
        min_length=1,
        description="Name patterns of the nn.Linear layers whose outputs are rescaled.",
    )
    feedforward_modules: list[str] = Field(
        default_factory=list,
        description=(
            "Name patterns of nn.Linear layers whose inputs are rescaled instead (IA³'s feed-forward vector, "
            "e.g. down_proj); [] = none."
        ),
    )


class ScaledLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, on_input: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.on_input = on_input
        width = base_layer.in_features if on_input else base_layer.out_features
        self.ia3_scale = nn.Parameter(torch.ones(width, dtype=base_layer.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.on_input:
            return self.base_layer(x * self.ia3_scale)
        return self.base_layer(x) * self.ia3_scale

    @torch.no_grad()
    def rescale(self, factor: torch.Tensor) -> None:
        if self.on_input:
            self.base_layer.weight.mul_(factor[None, :])
            return
        self.base_layer.weight.mul_(factor[:, None])
        if self.base_layer.bias is not None:
            self.base_layer.bias.mul_(factor)


@dataclass
class OutputScale(RowDelta):
    """``y * scale``: a rescaled output, for the rows of one adapter."""

    scale: torch.Tensor

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


@dataclass
class InputScale(RowDelta):
    """``base_layer(x * scale)``: the layer run again on a rescaled input, for the rows of one adapter."""

    scale: torch.Tensor

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return base_layer(x * self.scale)


class IA3(PeftMethod):
    name = "ia3"
    Config = IA3Config
    mergeable = True
    inference_overhead = "none when merged; unmerged, one elementwise multiply per adapted layer"
    paper = "Liu et al. 2022, arXiv:2205.05638"
    default_lr = 3e-2

    def _inject(self, model: nn.Module, config: IA3Config) -> None:
        # the default names both families' projections; keep the patterns this model has
        names = [n for n, _ in model.named_modules()]
        patterns = [p for p in config.target_modules if any(name_matches(n, p) for n in names)]
        inputs = dict(find_modules(model, config.feedforward_modules)) if config.feedforward_modules else {}
        for name, layer in find_modules(model, patterns or config.target_modules):
            if name not in inputs:
                replace_module(model, name, ScaledLinear(layer))
        for name, layer in inputs.items():
            replace_module(model, name, ScaledLinear(layer, on_input=True))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.endswith(".ia3_scale")

    def row_deltas(self, base: nn.Module, config: IA3Config, state: dict[str, torch.Tensor]) -> list[RowDelta]:
        deltas: list[RowDelta] = []
        for key in sorted(state):
            module = key[: -len(".ia3_scale")]
            on_input = any(name_matches(module, p) for p in config.feedforward_modules)
            deltas.append((InputScale if on_input else OutputScale)(module, state[key]))
        return deltas

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
