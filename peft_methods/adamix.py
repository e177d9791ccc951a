"""AdaMix: Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning"
(arXiv:2205.12410); reference implementation github.com/microsoft/AdaMix (``expert_soup.py``).

Every adapted sublayer (placed as in peft_methods.bottleneck) holds ``num_experts`` bottleneck
adapters. As in the reference, all experts start as copies of ONE initialisation (it deep-copies one
``nn.Linear`` per expert), so the experts' weight average is, at first, exactly every route's adapter
and stays close to them while training keeps them together. ``share_up`` keeps a single
up-projection shared by all experts (the reference's ``sharing_up=1``, used in its GLUE scripts);
the down-projections are always per expert (``sharing_down=0``).

Training: each forward routes, in every adapted sublayer, through a random down- and a random
up-expert (chosen per forward, for the whole batch, as in the reference). Consistency
regularisation as in the paper: :meth:`AdaMix.training_loss` runs the whole model twice on the same
micro-batch (two independent random routes) and adds ``consistency_weight`` times the symmetric KL
``(KL(p1||p2) + KL(p2||p1)) / 2`` between the two predictions, each direction pulling one pass
towards the other's detached distribution, as the reference does. Sequence classifiers compare the
class distributions (batch mean); causal LMs the next-token distributions at the positions that
are scored (label != -100), averaged over those positions. The task loss is the first pass's, as in
the paper's objective and the reference (its second pass adds only the KL term).

Inference uses one adapter whose weights are the experts' average ("merging by weight averaging",
the reference's ``inference_level=3``), so serving costs exactly one bottleneck adapter; that
averaged adapter is also what is saved (``keep_experts`` adds the experts themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

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
    share_up: bool = Field(
        default=True,
        description="One up-projection shared by all experts (the reference's sharing_up, on in its GLUE "
        "scripts); only the down-projections are mixed. False = num_experts up-projections too.",
    )
    consistency_weight: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the symmetric KL between two stochastic forward passes (two random routes) of "
        "each training batch; 0 = off (and one forward per batch).",
    )
    keep_experts: bool = Field(
        default=False,
        description="Also save every expert (num_experts times the size), e.g. to resume training; "
        "by default only their average, the adapter used for inference, is saved.",
    )


class ExpertBank(nn.Module):
    """``num_experts`` bottleneck adapters, stacked along dim 0 of four parameters (the up-projection's
    two hold one entry when it is shared).

    Stacked parameters of one module (rather than a ModuleList) let the eval path average them in
    forward, and ZeRO-3 gathers them with this module.
    """

    def __init__(self, hidden: int, config: AdaMixConfig, factory: dict):
        super().__init__()
        n, size = config.num_experts, bottleneck_size(hidden, config)
        ups = 1 if config.share_up else n
        self.down_weight = nn.Parameter(torch.empty(n, size, hidden, **factory))
        self.down_bias = nn.Parameter(torch.empty(n, size, **factory))
        self.up_weight = nn.Parameter(torch.empty(ups, hidden, size, **factory))
        self.up_bias = nn.Parameter(torch.empty(ups, hidden, **factory))
        self.act = ACTIVATIONS[config.nonlinearity]()
        with torch.no_grad():  # one expert initialised like an nn.Linear + a bottleneck up-projection...
            nn.init.kaiming_uniform_(self.down_weight[0], a=math.sqrt(5))
            nn.init.uniform_(self.down_bias[0], -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
            init_up_projection(self.up_weight[0], self.up_bias[0], config.init_scale)
            for p in self.stacked():  # ...and every other expert a copy of it
                p[1:] = p[0]

    def stacked(self) -> tuple[nn.Parameter, ...]:
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def averaged(self) -> tuple[torch.Tensor, ...]:
        # Anchored at expert 0 so that identical experts (a loaded average) reproduce their weights
        # bit for bit, which a plain mean of equal floats does not guarantee.
        return tuple(p[0] + (p - p[0]).mean(0) for p in self.stacked())

    def _adapter(self, y, down_w, down_b, up_w, up_b) -> torch.Tensor:
        return F.linear(self.act(F.linear(y, down_w, down_b)), up_w, up_b)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._adapter(y, *self.averaged())
        down = int(torch.randint(self.down_weight.shape[0], ()))
        up = int(torch.randint(self.up_weight.shape[0], ()))
        return self._adapter(y, self.down_weight[down], self.down_bias[down], self.up_weight[up], self.up_bias[up])


class AdaMixLinear(nn.Module):
    """A frozen output projection followed by a mixture of bottleneck adapters."""

    def __init__(self, base_layer: nn.Linear, config: AdaMixConfig):
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.adamix_experts = ExpertBank(base_layer.out_features, config, factory)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight.dtype` keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adamix_experts(y)


def symmetric_kl(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``(KL(p1||p2) + KL(p2||p1)) / 2`` between the softmaxes of two passes' logits, each KL's target
    detached (as the reference does). Logits of shape (batch, classes): the batch mean. Causal-LM
    logits (batch, length, vocab): the mean over the positions whose next-token label is not -100
    (every position when ``labels`` is None)."""
    if first.dim() == 3:
        if labels is not None:
            scored = labels[:, 1:] != -100  # logits at t predict the label at t + 1
            first, second = first[:, :-1][scored], second[:, :-1][scored]
        else:
            first, second = first.flatten(0, 1), second.flatten(0, 1)
        if first.shape[0] == 0:
            return first.sum() * 0 + second.sum() * 0  # nothing scored: a zero that keeps the graph
    log_p, log_q = F.log_softmax(first.float(), -1), F.log_softmax(second.float(), -1)
    kl_pq = F.kl_div(log_q, log_p.detach(), log_target=True, reduction="batchmean")  # KL(p||q), moves q
    kl_qp = F.kl_div(log_p, log_q.detach(), log_target=True, reduction="batchmean")  # KL(q||p), moves p
    return 0.5 * (kl_pq + kl_qp)


class AdaMix(PeftMethod):
    name = "adamix"
    Config = AdaMixConfig
    mergeable = False
    inference_overhead = (
        "one bottleneck adapter (two small matmuls) per adapted sublayer, the experts' average; cannot be merged"
    )
    paper = "Wang et al. 2022, arXiv:2205.12410"
    default_lr = 2e-3

    def _inject(self, model: nn.Module, config: AdaMixConfig) -> None:
        for name, layer in adapted_sublayers(model, config.placement):
            # A fresh module is in training mode; an eval-mode model must stay deterministic.
            replace_module(model, name, AdaMixLinear(layer, config).train(layer.training))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return ".adamix_experts." in name

    def row_deltas(self, base: nn.Module, config: AdaMixConfig, state: dict[str, torch.Tensor]) -> list[OutputAdapter]:
        """The averaged adapter, served like a bottleneck adapter (kept experts are not needed)."""
        return output_adapter_deltas(config, {k: v for k, v in state.items() if ".adamix_experts." not in k})

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      forward: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's objective: the task loss of one random route plus ``consistency_weight`` times the
        symmetric KL between its predictions and those of a second, independent route on the same batch.
        One forward (no KL) when the term is off, the model is in eval mode, or there is a single route."""
        config = applied_config(model)
        if config.consistency_weight == 0 or config.num_experts == 1 or not model.training:
            out = forward()
            return out.loss, out.loss
        first, second = forward(), forward()
        consistency = symmetric_kl(first.logits, second.logits, batch.get("labels"))
        return first.loss, first.loss + config.consistency_weight * consistency

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
