"""Diff pruning: Guo et al. 2021, "Parameter-Efficient Transfer Learning with Diff Pruning"
(arXiv:2012.07463).

Each targeted frozen weight ``W`` gains a task-specific difference ``delta ⊙ z``: ``delta`` is a
dense trainable tensor (zero-initialised, so training starts at the base model) and ``z`` a
per-entry hard-concrete gate (Louizos et al. 2018, arXiv:1712.01312) whose ``log_alpha`` is
trained too. ``regularization_loss`` adds ``l0_weight`` times the expected *fraction* of open gates
(the paper's sum over entries, divided by their number, so one weight suits models of any size).

Outside training the diff is *projected* to exactly ``target_sparsity`` of the entries: the
deterministic gate gives ``delta ⊙ z``, and only its largest-magnitude entries are kept. Eval
forward, saving and merging all use this same projection, so what is evaluated is what is saved.
The adapter file holds flat int64 ``indices`` and ``values`` per weight instead of dense tensors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod, applied_config, check_state_keys
from peft_methods.row_deltas import SparseDelta
from peft_methods.targeting import ALL_LINEAR_IN_BLOCKS, default_targets, find_modules, replace_module

# Hard-concrete constants from Louizos et al.: temperature and stretch interval (gamma, zeta).
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
# log_alpha written on load: any |value| above log(11) ≈ 2.4 saturates the deterministic gate at
# exactly 0 or 1, so a reloaded model reproduces the saved sparse diff bit for bit.
_LOADED_OPEN, _LOADED_CLOSED = 10.0, -10.0
_INDICES, _VALUES = ".diff_indices", ".diff_values"


class DiffPruningConfig(MethodConfig):
    method: Literal["diff_pruning"] = Field(default="diff_pruning", description="Selects diff pruning.")
    target_sparsity: float = Field(
        default=0.005, gt=0, le=1,
        description="Fraction of each targeted weight's entries kept in the final diff (0.005 = 0.5%).",
    )
    l0_weight: float = Field(
        default=0.1, ge=0, allow_inf_nan=False,
        description="Weight of the expected-L0 penalty in the loss, as the expected fraction of open gates (0–1).",
    )
    init_log_alpha: float = Field(
        default=1.0, ge=-10, le=10,
        description="Initial log_alpha of every gate; positive starts with most gates open.",
    )
    target_modules: list[str] | None = Field(
        default=None, min_length=1,
        description=(
            "Name patterns of the nn.Linear layers whose weights get a diff (see peft_methods.targeting). "
            "None = every linear layer of the transformer blocks for the model's family."
        ),
    )


class DiffLinear(nn.Module):
    """A frozen ``base_layer`` plus a gated, prunable weight difference."""

    def __init__(self, base_layer: nn.Linear, target_sparsity: float, init_log_alpha: float):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.diff_delta = nn.Parameter(torch.zeros_like(w))
        self.diff_log_alpha = nn.Parameter(torch.full_like(w, init_log_alpha))
        self.keep = max(1, round(target_sparsity * w.numel()))
        self.merged = False
        self.l0_term: torch.Tensor | None = None  # set by a training forward, consumed by the loss
        self.train(base_layer.training)  # a model applied in eval mode must stay deterministic

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def expected_l0(self) -> torch.Tensor:
        """Sum over entries of P(gate ≠ 0) (Louizos et al., eq. 12)."""
        return torch.sigmoid(self.diff_log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def sparse_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices and values of the kept (largest |deterministic diff|) entries."""
        gate = (torch.sigmoid(self.diff_log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        diff = (self.diff_delta * gate).flatten()
        indices = diff.abs().topk(self.keep, sorted=False).indices.sort().values
        return indices, diff[indices]

    def pruned_diff(self) -> torch.Tensor:
        indices, values = self.sparse_entries()
        flat = torch.zeros(self.diff_delta.numel(), device=values.device, dtype=values.dtype)
        return flat.index_put((indices,), values).view_as(self.diff_delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # through the module, so ZeRO-3 gathers its weight
        if self.merged:
            return out
        if not self.training:
            return out + F.linear(x, self.pruned_diff())
        u = torch.rand_like(self.diff_log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.diff_log_alpha) / BETA)
        gate = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        if torch.is_grad_enabled():
            # Computed here because under ZeRO-3 log_alpha holds its data only inside forward.
            self.l0_term = self.expected_l0()
        return out + F.linear(x, self.diff_delta * gate)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.pruned_diff()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.pruned_diff()
            self.merged = False


class DiffPruning(PeftMethod):
    name = "diff_pruning"
    Config = DiffPruningConfig
    mergeable = True
    inference_overhead = (
        "none when merged; unmerged, every adapted layer re-derives its top-k diff and runs a second "
        "dense matmul with it (roughly doubling those layers' cost)"
    )
    paper = "Guo et al. 2021, arXiv:2012.07463"

    def _inject(self, model: nn.Module, config: DiffPruningConfig) -> None:
        patterns = config.target_modules or default_targets(model, ALL_LINEAR_IN_BLOCKS, "diff-pruning targets")
        for name, layer in find_modules(model, patterns):
            replace_module(model, name, DiffLinear(layer, config.target_sparsity, config.init_log_alpha))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.endswith((".diff_delta", ".diff_log_alpha"))

    def row_deltas(self, base: nn.Module, config: DiffPruningConfig, state: dict[str, torch.Tensor]
                   ) -> list[SparseDelta]:
        """Each layer's kept entries as a sparse weight difference."""
        modules, deltas = dict(base.named_modules()), []
        for m in sorted(k[: -len(_INDICES)] for k in state if k.endswith(_INDICES)):
            shape = modules[m].weight.shape
            flat = state[m + _INDICES]
            coords = torch.stack([flat // shape[1], flat % shape[1]])
            sparse = torch.sparse_coo_tensor(coords, state[m + _VALUES], tuple(shape), check_invariants=True)
            deltas.append(SparseDelta(m, sparse.coalesce()))
        return deltas

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``l0_weight`` × expected L0 norm, from the terms the last training forward recorded;
        without such a forward (outside ZeRO-3 only) it is computed from the parameters."""
        layers = _diff_layers(model)
        if not layers:
            return None
        cached = [m.l0_term for _, m in layers if m.l0_term is not None]
        for _, m in layers:
            m.l0_term = None  # each graph is used by exactly one backward
        total = sum(cached) if cached else sum(m.expected_l0() for _, m in layers)
        # Normalised by the number of gated entries: an unnormalised sum over millions of gates
        # swamps the task loss and, through gradient clipping, starves the task head of updates.
        gated = sum(
            m.diff_log_alpha.ds_numel if hasattr(m.diff_log_alpha, "ds_numel") else m.diff_log_alpha.numel()
            for _, m in layers
        )
        return applied_config(model).l0_weight * total / gated

    def _head_parameters(self, model: nn.Module) -> set[str]:
        """Owned parameters saved as they are (modules_to_save), i.e. all but delta and log_alpha."""
        config = applied_config(model)
        return {n for n in self.trainable_parameter_names(model) if not self.is_adapter_parameter(n, config)}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Task-head parameters as they are, and per adapted layer the kept diff entries."""
        heads = self._head_parameters(model)
        state = {n: p.detach() for n, p in model.named_parameters() if n in heads}
        with torch.no_grad():
            for name, layer in _diff_layers(model):
                indices, values = layer.sparse_entries()
                state[name + _INDICES], state[name + _VALUES] = indices.long(), values.detach()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Scatter the saved entries into ``delta`` and pin the gates: open there, closed elsewhere."""
        params, layers = dict(model.named_parameters()), dict(_diff_layers(model))
        expected = self._head_parameters(model)
        expected |= {n + suffix for n in layers for suffix in (_INDICES, _VALUES)}
        check_state_keys(self.name, expected, state)
        for name, layer in layers.items():  # check everything before changing anything
            indices, values = state[name + _INDICES], state[name + _VALUES]
            numel = layer.diff_delta.numel()
            if indices.shape != (layer.keep,) or values.shape != (layer.keep,) or indices.dtype != torch.int64:
                raise ValueError(f"{self.name}: {name} needs {layer.keep} int64 indices and values, "
                                 f"got {tuple(indices.shape)} {indices.dtype} and {tuple(values.shape)}")
            if indices.min() < 0 or indices.max() >= numel or indices.unique().numel() != indices.numel():
                raise ValueError(f"{self.name}: {name} indices must be distinct and in [0, {numel})")
        for n in expected & params.keys():
            if params[n].shape != state[n].shape:
                raise ValueError(
                    f"{self.name}: {n} has shape {tuple(state[n].shape)}, model expects {tuple(params[n].shape)}"
                )
        with torch.no_grad():
            for n in expected & params.keys():
                params[n].copy_(state[n])
            for name, layer in layers.items():
                indices = state[name + _INDICES].to(layer.diff_delta.device)
                delta, log_alpha = layer.diff_delta.view(-1), layer.diff_log_alpha.view(-1)
                delta.zero_()
                delta[indices] = state[name + _VALUES].to(delta)
                log_alpha.fill_(_LOADED_CLOSED)
                log_alpha[indices] = _LOADED_OPEN


def _diff_layers(model: nn.Module) -> list[tuple[str, DiffLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiffLinear)]
