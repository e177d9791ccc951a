"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"
(arXiv:1902.00751).

A small two-layer network with a residual, ``y + up(act(down(y)))``, is inserted after the output
projection of a transformer sublayer: before BERT's dropout + residual + LayerNorm, after LLaMA's
``o_proj`` / ``down_proj``. ``placement="houlsby"`` adapts both the attention and the feed-forward
sublayer of every block; ``"pfeiffer"`` only the feed-forward one (Pfeiffer et al. 2021,
arXiv:2005.00247). The up-projection starts at zero (or tiny values), so training starts from the
base model's behaviour. The non-linearity sits between the projections, so nothing can be folded
into the base weights: serving always pays for the adapter.

Houlsby et al. also train the layer normalisation parameters ("the adapter, the layer normalization
parameters, and the final classification layer", their Figure 2); their code (google-research/adapter-bert)
trains every LayerNorm of BERT, the embeddings' included, without weight decay. ``train_layer_norms``
(on by default) does the same: every normalisation layer of the backbone that has parameters (BERT's
``embeddings.LayerNorm`` and each block's ``attention.output.LayerNorm`` / ``output.LayerNorm``; LLaMA's
``input_layernorm`` / ``post_attention_layernorm`` of each block and the final ``norm``, which in a
pre-norm decoder is what first normalises the last block's output, as BERT's last ``output.LayerNorm``
does) is trained, saved with the adapter and kept out of weight decay (optimizer group ``norms``).
Norms without parameters (OLMo's) have nothing to train. Served and packed adapters give each row its
own norm parameters (:class:`~peft_methods.row_deltas.OwnParameters`).

The sublayer discovery and the adapter's shape fields are shared with AdaMix (peft_methods.adamix).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.row_deltas import OutputAdapter, OwnParameters
from peft_methods.targeting import ATTENTION_QV, default_targets, find_modules, replace_module, task_head_names

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# targeting keys its tables by model family; keying ours by how a family names its query projection
# covers every family targeting knows without keeping a second list of families in sync.
_OUTPUT_PROJECTIONS = {
    "query": ("attention.output.dense", "output.dense"),  # BERT-like: BertSelfOutput, BertOutput
    "q_proj": ("o_proj", "down_proj"),  # LLaMA-like
    "q_lin": ("out_lin", "lin2"),  # DistilBERT
}
ATTENTION_OUTPUT = {f: [_OUTPUT_PROJECTIONS[qv[0]][0]] for f, qv in ATTENTION_QV.items()}
FFN_OUTPUT = {f: [_OUTPUT_PROJECTIONS[qv[0]][1]] for f, qv in ATTENTION_QV.items()}


class AdapterShapeConfig(MethodConfig):
    """Fields shared by bottleneck adapters and AdaMix (which mixes several of them)."""

    reduction_factor: float = Field(
        default=16,
        gt=0,
        description="Hidden size / bottleneck size; the bottleneck has max(1, hidden // factor) units.",
    )
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        default="relu", description="Activation between the down- and the up-projection."
    )
    placement: Literal["houlsby", "pfeiffer"] = Field(
        default="houlsby",
        description="houlsby = an adapter after the attention and after the feed-forward sublayer of every block; "
        "pfeiffer = after the feed-forward sublayer only.",
    )
    init_scale: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Standard deviation of the up-projection's initial weights (its bias starts at zero). "
        "0 = zeros, so the adapted model starts exactly at the base model's outputs.",
    )


def bottleneck_size(hidden: int, config: AdapterShapeConfig) -> int:
    return max(1, int(hidden // config.reduction_factor))


def adapted_sublayers(model: nn.Module, placement: str) -> list[tuple[str, nn.Linear]]:
    """The output projections to wrap, by full name: attention (houlsby only), then feed-forward."""
    attention = find_modules(model, default_targets(model, ATTENTION_OUTPUT, "adapter placement"))
    # BERT's FFN pattern `output.dense` also matches `attention.output.dense`: tell them apart by name.
    attention_names = {n for n, _ in attention}
    ffn = [(n, m) for n, m in find_modules(model, default_targets(model, FFN_OUTPUT, "adapter placement"))
           if n not in attention_names]
    return (attention if placement == "houlsby" else []) + ffn


def init_up_projection(weight: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
    """Near-identity start: the adapter adds (almost) nothing until it has been trained."""
    with torch.no_grad():
        if scale > 0:
            weight.normal_(0.0, scale)
        else:
            weight.zero_()
        bias.zero_()


def output_adapter_deltas(config: AdapterShapeConfig, state: dict[str, torch.Tensor]) -> list[OutputAdapter]:
    """Saved bottleneck tensors (``<module>.adapter_down.weight`` ...) as mixed-batch deltas."""
    act = ACTIVATIONS[config.nonlinearity]()
    return [
        OutputAdapter(m, state[f"{m}.adapter_down.weight"], state[f"{m}.adapter_down.bias"],
                      state[f"{m}.adapter_up.weight"], state[f"{m}.adapter_up.bias"], act)
        for m in sorted(k[: -len(".adapter_down.weight")] for k in state if k.endswith(".adapter_down.weight"))
    ]


def own_parameter_deltas(state: dict[str, torch.Tensor]) -> list[OwnParameters]:
    """Saved parameters of whole base modules (``<module>.weight``, ``<module>.bias``, e.g. trained norms) as
    mixed-batch deltas that run each module with its adapter's own parameters."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, attr = key.rpartition(".")
        if attr not in ("weight", "bias"):
            raise ValueError(f"bottleneck: saved tensor {key} is neither an adapter's nor a norm's weight or bias")
        modules.setdefault(module, {})[attr] = tensor
    return [OwnParameters(m, modules[m].get("weight"), modules[m].get("bias")) for m in sorted(modules)]


_NORMS_ATTR = "peftfleet_bottleneck_norms"  # names of the norm modules a bottleneck adapter trains, on the model


def normalisation_layers(model: nn.Module) -> list[str]:
    """Every normalisation layer (LayerNorm, RMSNorm: a class named ``*Norm``) with parameters of its own,
    outside the task heads."""
    heads = task_head_names(model)
    return [n for n, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and any(True for _ in m.parameters(recurse=False))
            and not any(n == h or n.startswith(h + ".") for h in heads)]


class BottleneckConfig(AdapterShapeConfig):
    method: Literal["bottleneck"] = Field(default="bottleneck", description="Selects bottleneck adapters.")
    train_layer_norms: bool = Field(
        default=True,
        description="Also train (and save) the weight and bias of every normalisation layer of the backbone "
        "(LayerNorm / RMSNorm), without weight decay, as Houlsby et al. do. False = the adapters alone.",
    )


class BottleneckLinear(nn.Module):
    """A frozen output projection followed by a residual bottleneck adapter."""

    def __init__(self, base_layer: nn.Linear, config: AdapterShapeConfig):
        super().__init__()
        hidden = base_layer.out_features
        size = bottleneck_size(hidden, config)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.adapter_down = nn.Linear(hidden, size, **factory)
        self.adapter_act = ACTIVATIONS[config.nonlinearity]()
        self.adapter_up = nn.Linear(size, hidden, **factory)
        init_up_projection(self.adapter_up.weight, self.adapter_up.bias, config.init_scale)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight.dtype` keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter_up(self.adapter_act(self.adapter_down(y)))


class BottleneckAdapters(PeftMethod):
    name = "bottleneck"
    Config = BottleneckConfig
    mergeable = False
    inference_overhead = "two small matmuls (hidden × hidden/reduction_factor) per adapted sublayer; cannot be merged"
    paper = "Houlsby et al. 2019, arXiv:1902.00751"
    default_lr = 2e-3

    def _inject(self, model: nn.Module, config: BottleneckConfig) -> None:
        norms = normalisation_layers(model) if config.train_layer_norms else []
        for name, layer in adapted_sublayers(model, config.placement):
            replace_module(model, name, BottleneckLinear(layer, config).train(layer.training))
        setattr(model, _NORMS_ATTR, tuple(norms))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return ".adapter_down." in name or ".adapter_up." in name

    def owns(self, model: nn.Module, name: str) -> bool:
        """The adapters' parameters, the task heads and, with ``train_layer_norms``, the norms' parameters."""
        return super().owns(model, name) or name.rpartition(".")[0] in getattr(model, _NORMS_ATTR, ())

    def optimizer_groups(self, model: nn.Module, names: Iterable[str], *, lr: float, head_lr: float,
                         weight_decay: float) -> list[dict[str, Any]]:
        """As every method's, but the norms' parameters form a group ``norms`` at the adapters' ``lr``
        without weight decay (decay would pull a LayerNorm's gain towards zero, not towards the base's)."""
        norms = set(getattr(model, _NORMS_ATTR, ()))
        groups = super().optimizer_groups(model, names, lr=lr, head_lr=head_lr, weight_decay=weight_decay)
        for group in groups:
            if group["name"] == "adapter":
                own = [n for n in group["names"] if n.rpartition(".")[0] in norms]
                group["names"] = [n for n in group["names"] if n not in own]
                if own:
                    groups.append({"name": "norms", "names": own, "lr": lr, "weight_decay": 0.0})
                break
        return [g for g in groups if g["names"]]

    def loading_config(self, config: BottleneckConfig, state: dict[str, torch.Tensor]) -> BottleneckConfig:
        """Adapters saved before ``train_layer_norms`` existed (their config lacks it, so it reads as the
        default, True) hold no norms: they load as the adapters-only config they were trained with."""
        heads = config.modules_to_save if config.modules_to_save is not None else ("classifier", "score")
        norms = [k for k in state if not self.is_adapter_parameter(k, config)
                 and not any(k.startswith(h + ".") for h in heads)]
        if norms or not config.train_layer_norms:
            return config
        return config.model_copy(update={"train_layer_norms": False})

    def packing_problem(self, config: BottleneckConfig) -> str | None:
        return None  # OutputAdapter and OwnParameters compute exactly the training forward, gradients included

    def row_deltas(self, base: nn.Module, config: BottleneckConfig, state: dict[str, torch.Tensor]
                   ) -> list[OutputAdapter | OwnParameters]:
        adapters = {k: v for k, v in state.items() if self.is_adapter_parameter(k, config)}
        norms = {k: v for k, v in state.items() if k not in adapters}
        return [*output_adapter_deltas(config, adapters), *own_parameter_deltas(norms)]
