"""FAR (Freeze And Reconfigure): Vucetic et al. 2022, "Efficient Fine-Tuning of BERT Models on the
Edge" (arXiv:2205.01541).

Only feed-forward units train, and only a ``fraction`` of them per layer. A *unit* is one
intermediate neuron of a block's FFN; its trainable weights are its incoming ones: the unit's row
(and bias entry) of every FFN input projection — ``intermediate.dense`` for BERT-like encoders,
both ``gate_proj`` and ``up_proj`` for LLaMA-like decoders (the unit computes
``silu(gate_j·x) * (up_j·x)``). Outgoing weights (``output.dense`` / ``down_proj`` columns) stay
frozen, so every unit of a layer costs ``in_features (+1 for a bias)`` values per input projection.

Reconfigure: each input projection keeps its full weight frozen and gains a small trainable
``(k, in)`` copy of the selected rows; forward overwrites the selected outputs with the small
layer's, so no gradient of the large frozen weight is ever formed. Merging writes the rows back.

Selection (``prime``): over a few training batches, the L1 norm of each unit's weight gradient is
accumulated — a one-shot stand-in for the paper's short priming fine-tune, whose largest weight
changes follow the largest gradients — and the top ``fraction`` units of each layer are kept.
Without ``prime`` (e.g. right after ``apply``) the first ``k`` units of each layer train.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod, check_state_keys
from peft_methods.row_deltas import RowOverride
from peft_methods.targeting import ALL_LINEAR_IN_BLOCKS, default_targets, find_modules, replace_module

# Names (in the targeting tables) of the projections that feed FFN units, per architecture.
_FFN_INPUTS = {"intermediate.dense", "gate_proj", "up_proj", "lin1"}
_ROWS = ".far_rows"


class FARConfig(MethodConfig):
    method: Literal["far"] = Field(default="far", description="Selects FAR (Freeze And Reconfigure).")
    fraction: float = Field(
        default=0.1, gt=0, le=1,
        description="Fraction of each layer's FFN units (intermediate neurons) that train, at least one.",
    )
    target_modules: list[str] | None = Field(
        default=None, min_length=1,
        description=(
            "Name patterns of the FFN input projections whose output rows are the units (see "
            "peft_methods.targeting); projections in the same parent module share one unit selection. "
            "None = `intermediate.dense` (BERT-like) or `gate_proj` and `up_proj` (LLaMA-like)."
        ),
    )


class FARLinear(nn.Module):
    """A frozen ``base_layer`` whose output rows ``far_rows`` come from a small trainable layer."""

    def __init__(self, base_layer: nn.Linear, k: int):
        super().__init__()
        self.base_layer = base_layer
        rows = torch.arange(k, device=base_layer.weight.device)
        self.register_buffer("far_rows", rows)
        self.far_weight = nn.Parameter(base_layer.weight.detach()[rows].clone())
        has_bias = base_layer.bias is not None
        self.far_bias = nn.Parameter(base_layer.bias.detach()[rows].clone()) if has_bias else None
        self.priming = False  # while priming, the plain frozen layer runs so its weight gets gradients
        self.merged_originals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.train(base_layer.training)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # through the module, so ZeRO-3 gathers its weight
        if self.priming or self.merged_originals is not None:
            return out
        return out.index_copy(-1, self.far_rows, F.linear(x, self.far_weight, self.far_bias))

    @torch.no_grad()
    def select(self, rows: torch.Tensor) -> None:
        """Train ``rows`` from now on, starting from their frozen values."""
        self.far_rows.copy_(rows)
        self.far_weight.copy_(self.base_layer.weight[rows])
        if self.far_bias is not None:
            self.far_bias.copy_(self.base_layer.bias[rows])

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_originals is None:
            w, b, rows = self.base_layer.weight, self.base_layer.bias, self.far_rows
            self.merged_originals = (w[rows].clone(), None if b is None else b[rows].clone())
            w[rows] = self.far_weight
            if b is not None:
                b[rows] = self.far_bias

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_originals is not None:
            weight, bias = self.merged_originals
            self.base_layer.weight[self.far_rows] = weight
            if bias is not None:
                self.base_layer.bias[self.far_rows] = bias
            self.merged_originals = None


class FAR(PeftMethod):
    name = "far"
    Config = FARConfig
    mergeable = True
    inference_overhead = (
        "none when merged; unmerged, one extra (k × in) matmul and an output scatter per FFN input "
        "projection (k = fraction of its units)"
    )
    default_lr = 2e-3
    paper = "Vucetic et al. 2022, arXiv:2205.01541"

    def _inject(self, model: nn.Module, config: FARConfig) -> None:
        patterns = config.target_modules
        if patterns is None:
            defaults = default_targets(model, ALL_LINEAR_IN_BLOCKS, "FAR feed-forward layers")
            patterns = [p for p in defaults if p in _FFN_INPUTS]
        found = find_modules(model, patterns)
        for _, group in _groups(found):
            sizes = {layer.out_features for _, layer in group}
            if len(sizes) != 1:
                raise ValueError(f"FAR: {[n for n, _ in group]} share units but have output sizes {sorted(sizes)}")
        for name, layer in found:
            k = max(1, round(config.fraction * layer.out_features))
            replace_module(model, name, FARLinear(layer, k))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.endswith((".far_weight", ".far_bias"))

    def row_deltas(self, base: nn.Module, config: FARConfig, state: dict[str, torch.Tensor]) -> list[RowOverride]:
        """Each adapted layer's trained rows replace the base's rows for the adapter's requests."""
        return [RowOverride(m, state[m + _ROWS], state[m + ".far_weight"], state.get(m + ".far_bias"))
                for m in sorted(k[: -len(_ROWS)] for k in state if k.endswith(_ROWS))]

    def prime(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Pick each layer's units by accumulated L1 norm of their incoming-weight gradients."""
        layers = _far_layers(model)
        scores = {name: torch.zeros(layer.base_layer.out_features, dtype=torch.float64) for name, layer in layers}
        device = next(model.parameters()).device
        was_training, seen = model.training, 0
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        try:
            model.train()  # as in the paper's priming fine-tune (dropout on)
            for _, layer in layers:
                layer.priming = True
                layer.base_layer.requires_grad_(True)
            for batch in batches:
                with torch.enable_grad():
                    model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
                for name, layer in layers:
                    base = layer.base_layer
                    score = base.weight.grad.abs().sum(dim=1)
                    if base.bias is not None:
                        score = score + base.bias.grad.abs()
                    scores[name] += score.double().cpu()
                    base.zero_grad(set_to_none=True)
                seen += 1
        finally:
            for _, layer in layers:
                layer.priming = False
            for n, p in model.named_parameters():
                p.requires_grad_(n in trainable)
                p.grad = None
            model.train(was_training)
        if not seen:
            return  # nothing to learn from: keep the default first-k units
        for _, group in _groups(layers):
            total = sum(scores[name] for name, _ in group)
            k = group[0][1].far_rows.numel()
            rows = total.topk(k).indices.sort().values
            for _, layer in group:
                layer.select(rows.to(layer.far_rows.device))

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable rows, the heads, and which rows of each projection they replace."""
        state = super().training_state(model)
        state.update({name + _ROWS: layer.far_rows for name, layer in _far_layers(model)})
        return state

    def packing_problem(self, config: FARConfig) -> str | None:
        return None  # its units are picked (prime) on the job's own shell of the base, from its own batches

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        layers = dict(_far_layers(model))
        params = dict(model.named_parameters())
        expected = set(self.adapter_state_dict(model))
        check_state_keys(self.name, expected, state)
        for name, layer in layers.items():  # check everything before changing anything
            rows, n_out = state[name + _ROWS], layer.base_layer.out_features
            if rows.shape != layer.far_rows.shape or rows.dtype != torch.int64:
                raise ValueError(f"{self.name}: {name}{_ROWS} must be {layer.far_rows.numel()} int64 row indices")
            if rows.min() < 0 or rows.max() >= n_out or rows.unique().numel() != rows.numel():
                raise ValueError(f"{self.name}: {name}{_ROWS} must be distinct rows in [0, {n_out})")
        for n in expected & params.keys():
            if params[n].shape != state[n].shape:
                raise ValueError(
                    f"{self.name}: {n} has shape {tuple(state[n].shape)}, model expects {tuple(params[n].shape)}"
                )
        with torch.no_grad():
            for name, layer in layers.items():
                layer.far_rows.copy_(state[name + _ROWS])
            for n in expected & params.keys():
                params[n].copy_(state[n])


def _groups(layers: list[tuple[str, nn.Module]]) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """Projections grouped by parent module: gate_proj and up_proj of one MLP feed the same units."""
    groups: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, layer in layers:
        groups[name.rpartition(".")[0]].append((name, layer))
    return list(groups.items())


def _far_layers(model: nn.Module) -> list[tuple[str, FARLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FARLinear)]
