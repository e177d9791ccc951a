"""AdaMix: Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning"
(arXiv:2205.12410).

Every adapted sublayer (placed as in peft_methods.bottleneck) holds ``num_experts`` bottleneck
adapters. While training, each forward routes through a random down-projection and a random
up-projection, as in the paper. Inference uses one adapter whose weights are the experts' average
("merging by weight averaging"), so serving costs exactly one bottleneck adapter; that averaged
adapter is also what is saved (``keep_experts`` adds the experts themselves).

Consistency regularisation, adapted to a single-forward training loop: the paper runs the whole
model twice with different routes and adds a symmetric KL between the two predictions. Here each
adapted sublayer, in the same forward, also computes a second route through a different down and a
different up expert; the mean squared difference between the two routes' outputs (the sublayer
outputs differ by exactly that, as both add to the same projection output) is recorded, and
``regularization_loss`` returns its mean over sublayers times ``consistency_weight``, then clears
it. This pulls the experts' functions together layer by layer, which is what makes averaging them
afterwards safe, at the cost of a second (small) adapter computation per sublayer in training only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod, applied_config, check_state_keys
from peft_methods.bottleneck import (
    ACTIVATIONS,
    AdapterShapeConfig,
    adapted_sublayers,
    bottleneck_size,
    init_up_projection,
    output_adapter_deltas,
)
from peft_methods.row_deltas import OutputAdapter
from peft_methods.targeting import replace_module

# Names of the averaged adapter's tensors, relative to the adapted layer: a bottleneck adapter's.
AVERAGED = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class AdaMixConfig(AdapterShapeConfig):
    method: Literal["adamix"] = Field(default="adamix", description="Selects AdaMix.")
    num_experts: int = Field(default=4, gt=0, le=64, description="Bottleneck adapters (experts) per adapted sublayer.")
    consistency_weight: float = Field(
        default=1.0, ge=0, description="Weight of the consistency loss between two random routes; 0 = off."
    )
    keep_experts: bool = Field(
        default=False,
        description="Also save every expert (num_experts times the size), e.g. to resume training; "
        "by default only their average, the adapter used for inference, is saved.",
    )


class ExpertBank(nn.Module):
    """``num_experts`` bottleneck adapters, stacked along dim 0 of four parameters.

    Stacked parameters of one module (rather than a ModuleList) let the eval path average them in
    forward, and ZeRO-3 gathers them with this module. The bank returns its consistency term as a
    second output so that ZeRO-3's backward hook, which wraps module outputs, gathers the experts
    before that term's gradient needs them.
    """

    def __init__(self, hidden: int, config: AdaMixConfig, factory: dict):
        super().__init__()
        n, size = config.num_experts, bottleneck_size(hidden, config)
        self.down_weight = nn.Parameter(torch.empty(n, size, hidden, **factory))
        self.down_bias = nn.Parameter(torch.empty(n, size, **factory))
        self.up_weight = nn.Parameter(torch.empty(n, hidden, size, **factory))
        self.up_bias = nn.Parameter(torch.empty(n, hidden, **factory))
        self.act = ACTIVATIONS[config.nonlinearity]()
        self.consistency = config.consistency_weight > 0 and n > 1
        bound = 1 / math.sqrt(hidden)
        for e in range(n):  # each expert initialised like its own nn.Linear, so they start different
            nn.init.kaiming_uniform_(self.down_weight[e], a=math.sqrt(5))
            nn.init.uniform_(self.down_bias[e], -bound, bound)
            init_up_projection(self.up_weight[e], self.up_bias[e], config.init_scale)

    def stacked(self) -> tuple[nn.Parameter, ...]:
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def averaged(self) -> tuple[torch.Tensor, ...]:
        # Anchored at expert 0 so that identical experts (a loaded average) reproduce their weights
        # bit for bit, which a plain mean of equal floats does not guarantee.
        return tuple(p[0] + (p - p[0]).mean(0) for p in self.stacked())

    def _adapter(self, y, down_w, down_b, up_w, up_b) -> torch.Tensor:
        return F.linear(self.act(F.linear(y, down_w, down_b)), up_w, up_b)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training:
            return self._adapter(y, *self.averaged()), None
        n = self.down_weight.shape[0]
        down, up, shift_down, shift_up = torch.randint(n, (4,)).tolist()
        out = self._adapter(y, self.down_weight[down], self.down_bias[down], self.up_weight[up], self.up_bias[up])
        if not self.consistency:
            return out, None
        # The second route uses other experts than the first (never the same pair), so the term is
        # always informative; the paper's two independent passes can coincide.
        down2, up2 = (down + 1 + shift_down % (n - 1)) % n, (up + 1 + shift_up % (n - 1)) % n
        other = self._adapter(y, self.down_weight[down2], self.down_bias[down2], self.up_weight[up2], self.up_bias[up2])
        return out, (out - other).pow(2).mean()


class AdaMixLinear(nn.Module):
    """A frozen output projection followed by a mixture of bottleneck adapters."""

    def __init__(self, base_layer: nn.Linear, config: AdaMixConfig):
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.adamix_experts = ExpertBank(base_layer.out_features, config, factory)
        self.pending_consistency: torch.Tensor | None = None  # lives from one forward to regularization_loss

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight.dtype` keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        delta, self.pending_consistency = self.adamix_experts(y)
        return y + delta


class AdaMix(PeftMethod):
    name = "adamix"
    Config = AdaMixConfig
    mergeable = False
    inference_overhead = (
        "one bottleneck adapter (two small matmuls) per adapted sublayer, the experts' average; cannot be merged"
    )
    paper = "Wang et al. 2022, arXiv:2205.12410"

    def _inject(self, model: nn.Module, config: AdaMixConfig) -> None:
        for name, layer in adapted_sublayers(model, config.placement):
            # A fresh module is in training mode; an eval-mode model must stay deterministic.
            replace_module(model, name, AdaMixLinear(layer, config).train(layer.training))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return ".adamix_experts." in name

    def row_deltas(self, base: nn.Module, config: AdaMixConfig, state: dict[str, torch.Tensor]) -> list[OutputAdapter]:
        """The averaged adapter, served like a bottleneck adapter (kept experts are not needed)."""
        return output_adapter_deltas(config, {k: v for k, v in state.items() if ".adamix_experts." not in k})

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for layer in _adamix_layers(model).values():
            if layer.pending_consistency is not None:
                terms.append(layer.pending_consistency)
                layer.pending_consistency = None  # each forward's term is added to the loss once
        if not terms:
            return None
        return applied_config(model).consistency_weight * torch.stack(terms).mean()

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Task head + each layer's averaged adapter (as a bottleneck adapter's tensors), + experts if kept."""
        config = applied_config(model)
        state = {n: p for n, p in super().adapter_state_dict(model).items()
                 if config.keep_experts or not self.is_adapter_parameter(n, config)}
        for name, layer in _adamix_layers(model).items():
            for key, tensor in zip(AVERAGED, layer.adamix_experts.averaged()):
                state[f"{name}.{key}"] = tensor.detach()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Loads what :meth:`adapter_state_dict` wrote. Without kept experts, every expert becomes the
        saved average, so evaluation and further training both start from exactly that adapter."""
        config = applied_config(model)
        expected = {k: tuple(t.shape) for k, t in self.adapter_state_dict(model).items()}
        check_state_keys(self.name, set(expected), state)
        for n, t in state.items():  # check everything before changing anything
            if tuple(t.shape) != expected[n]:
                raise ValueError(f"{self.name}: {n} has shape {tuple(t.shape)}, model expects {expected[n]}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                if n in params:  # the task head, and the experts when they were kept
                    params[n].copy_(t)
            if not config.keep_experts:
                for name, layer in _adamix_layers(model).items():
                    for p, key in zip(layer.adamix_experts.stacked(), AVERAGED):
                        p.copy_(state[f"{name}.{key}"].unsqueeze(0).expand_as(p))


def _adamix_layers(model: nn.Module) -> dict[str, AdaMixLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaMixLinear)}
