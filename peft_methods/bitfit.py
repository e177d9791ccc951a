"""BitFit: Ben Zaken et al. 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (arXiv:2106.10199).

Only the bias terms train. LLaMA-like decoders have no biases at all: with
``add_missing_biases`` (the default) their block linears get zero-initialised biases first, so
the adapted model starts exactly at the base model's behaviour; without it such a model is
refused with an error saying so. The trained biases live in the model itself, so the adapted
model *is* the merged model: merging costs nothing and serving has no overhead.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.row_deltas import BiasShift
from peft_methods.targeting import ALL_LINEAR_IN_BLOCKS, find_modules, model_family


class BitFitConfig(MethodConfig):
    method: Literal["bitfit"] = Field(default="bitfit", description="Selects BitFit.")
    add_missing_biases: bool = Field(
        default=True,
        description=(
            "Give bias-free nn.Linear layers in `target_modules` a zero-initialised bias to train "
            "(needed for LLaMA-like models, which have none). False = train existing biases only."
        ),
    )
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Name patterns of the nn.Linear layers that receive missing biases. None = every "
            "linear layer of the transformer blocks for the model's family."
        ),
    )


class BitFit(PeftMethod):
    name = "bitfit"
    Config = BitFitConfig
    mergeable = True
    inference_overhead = "none: the trained biases replace the base's"
    default_lr = 4e-3
    paper = "Ben Zaken et al. 2021, arXiv:2106.10199"

    def _inject(self, model: nn.Module, config: BitFitConfig) -> None:
        if config.add_missing_biases:
            patterns = config.target_modules
            if patterns is None:
                patterns = ALL_LINEAR_IN_BLOCKS.get(model_family(model), [])
            for _, layer in find_modules(model, patterns) if patterns else []:
                if layer.bias is None:
                    w = layer.weight
                    layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=w.device, dtype=w.dtype))
        if not any(self.is_adapter_parameter(n, config) for n, _ in model.named_parameters()):
            raise ValueError(
                f"BitFit: {type(model).__name__} has no bias parameters to train; "
                "set add_missing_biases=true (and target_modules if its family is unknown)"
            )

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name == "bias" or name.endswith(".bias")

    def packing_problem(self, config: BitFitConfig) -> str | None:
        return None

    def row_deltas(self, base: nn.Module, config: BitFitConfig, state: dict[str, torch.Tensor]) -> list[BiasShift]:
        """Each trained bias as a shift from the base's (from zero where BitFit added the bias)."""
        modules = dict(base.named_modules())
        deltas = []
        for key in sorted(state):
            module = key.rsplit(".", 1)[0] if "." in key else ""
            if module not in modules:
                raise ValueError(f"bitfit: the adapter's {key} belongs to no module of this base")
            own = getattr(modules[module], "bias", None)
            deltas.append(BiasShift(module, state[key] - (own.detach().to(state[key].dtype) if own is not None else 0)))
        return deltas
