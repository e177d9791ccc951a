"""Diff pruning: Guo et al. 2021, "Parameter-Efficient Transfer Learning with Diff Pruning"
(arXiv:2012.07463; reference code github.com/dguo98/DiffPruning).

Each targeted frozen weight ``W`` gains a task-specific difference. Training has the paper's two phases:

1. **Gated diff.** The difference is ``delta ⊙ z``: ``delta`` is dense and zero-initialised (training
   starts at the base model), ``z`` a per-entry hard-concrete gate (Louizos et al. 2018,
   arXiv:1712.01312) with a trainable ``log_alpha``. The loss adds ``l0_weight`` times the expected
   *fraction* of open gates. As in the reference code the gates start open (``init_log_alpha`` 5),
   are stretched to (-1.5, 1.5) with temperature 1, and train in an optimizer group of their own
   (``gates``: ``gate_lr`` 0.1, no weight decay); ``delta`` follows the job's ``lr``, the task head
   its ``head_lr``.
2. **Fixed mask.** After ``fix_mask_at`` of the steps the deterministic gated diff
   ``delta ⊙ gate(log_alpha)`` is projected to its ``target_sparsity`` largest-magnitude entries per
   weight; those positions and their values at the switch are frozen in buffers, and every kept entry
   trains on from its value (no gates, no penalty): the paper's magnitude pruning then "fixmask"
   fine-tuning.

Where we differ from the reference: the penalty is normalised by the number of gated entries (the
reference sums ``sparsity_pen`` over entries), so ``l0_weight`` suits models of any size; the
projection keeps the same fraction of every weight (the reference searches one global threshold),
which keeps the saved entry count per weight fixed; only linear weights of the transformer blocks are
diffed (the reference diffs every parameter, embeddings included); both phases run in one job with one
learning-rate schedule instead of two runs; and phase 2 starts each kept entry from its gated value
at the switch, ``value₀ + (delta - delta₀)`` (the reference restarts from ``delta ⊙ mask``, dropping
the gate), so the model is continuous at the switch and every kept entry learns at the full rate, even
one whose gate had closed (an earlier version kept the gate as a factor: such entries stayed at zero).

Phase 2 lives only in buffers and the forward: parameters are never edited at the switch (under bf16
DeepSpeed's fp32 masters would overwrite such edits), and a checkpoint, which saves buffers, resumes
into the same mask. Outside training the diff is always the projected one: before the switch it is
re-derived from the current gates (:func:`dense_diff` evaluates the unprojected gated diff instead),
after it the fixed entries. Eval forward, saving and merging use the same entries, so what is
evaluated is what is saved. The adapter file holds flat int64 ``indices`` and ``values`` per weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod, applied_config, check_state_keys, no_gather
from peft_methods.row_deltas import SparseDelta
from peft_methods.targeting import ALL_LINEAR_IN_BLOCKS, default_targets, find_modules, replace_module

# Hard-concrete temperature and stretch interval (gamma, zeta) of the reference code (its
# --concrete_lower/--concrete_upper; Louizos et al. use 2/3 and (-0.1, 1.1)). With these a gate is
# open with probability sigmoid(log_alpha), and its deterministic value is 1 for log_alpha ≥ log 5.
BETA, GAMMA, ZETA = 1.0, -1.5, 1.5
# log_alpha written on load: any |value| above log 5 saturates the deterministic gate at exactly 0 or 1.
_LOADED_OPEN, _LOADED_CLOSED = 10.0, -10.0
_INDICES, _VALUES = ".diff_indices", ".diff_values"
_GATES = "gates"


class DiffPruningConfig(MethodConfig):
    method: Literal["diff_pruning"] = Field(default="diff_pruning", description="Selects diff pruning.")
    target_sparsity: float = Field(
        default=0.005, gt=0, le=1,
        description="Fraction of each targeted weight's entries kept in the final diff (0.005 = 0.5%).",
    )
    l0_weight: float = Field(
        default=100.0, ge=0, allow_inf_nan=False,
        description=(
            "Weight of the expected-L0 penalty, applied to the expected fraction of open gates (0–1). The "
            "penalty's gradient per gate is l0_weight / (number of gates) and must exceed AdamW's eps (1e-8) to "
            "move log_alpha at gate_lr; 100 leaves a few percent of the gates open at the switch (1000 closes "
            "them far past a 0.5% target; the projection enforces the target either way)."
        ),
    )
    init_log_alpha: float = Field(
        default=5.0, ge=-10, le=10,
        description="Initial log_alpha of every gate (the reference's alpha_init 5: all gates open, P(open) ≈ 0.993).",
    )
    gate_lr: float = Field(
        default=0.1, gt=0, le=10,
        description=(
            "Peak learning rate of the gates' log_alpha, an optimizer group of its own without weight decay "
            "(the reference's separate alpha optimizer uses 0.1); it follows the job's warm-up and decay."
        ),
    )
    fix_mask_at: float = Field(
        default=0.5, gt=0, le=1,
        description=(
            "Fraction of the training steps after which the gated diff is projected to its target_sparsity "
            "largest entries and only those train on, without gates or penalty (phase 2); 1 = never."
        ),
    )
    target_modules: list[str] | None = Field(
        default=None, min_length=1,
        description=(
            "Name patterns of the nn.Linear layers whose weights get a diff (see peft_methods.targeting). "
            "None = every linear layer of the transformer blocks for the model's family."
        ),
    )


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gate's test-time value, ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class DiffLinear(nn.Module):
    """A frozen ``base_layer`` plus a gated, prunable weight difference.

    Buffers (saved in checkpoints): ``diff_fixed`` says phase 2 has started; ``diff_kept`` holds the
    flat indices of the entries it trains (sorted), ``diff_kept_value`` their gated values and
    ``diff_kept_delta`` their ``delta`` at the switch."""

    def __init__(self, base_layer: nn.Linear, target_sparsity: float, init_log_alpha: float):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.diff_delta = nn.Parameter(torch.zeros_like(w))
        self.diff_log_alpha = nn.Parameter(torch.full_like(w, init_log_alpha))
        self.keep = max(1, round(target_sparsity * w.numel()))
        self.register_buffer("diff_fixed", torch.zeros((), dtype=torch.bool, device=w.device))
        self.register_buffer("diff_kept", torch.zeros(self.keep, dtype=torch.int64, device=w.device))
        self.register_buffer("diff_kept_value", torch.zeros(self.keep, dtype=w.dtype, device=w.device))
        self.register_buffer("diff_kept_delta", torch.zeros(self.keep, dtype=w.dtype, device=w.device))
        self._fixed: bool | None = False  # host copy of diff_fixed; None: read it (after a state-dict load)
        self.dense = False  # evaluate the unprojected gated diff (see dense_diff)
        self.merged = False
        self.l0_term: torch.Tensor | None = None  # set by a training forward, consumed by the loss
        self.train(base_layer.training)  # a model applied in eval mode must stay deterministic

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def fixed(self) -> bool:
        """Whether phase 2 (the fixed mask) has started; reads the buffer once after each load."""
        if self._fixed is None:
            self._fixed = bool(self.diff_fixed)
        return self._fixed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fixed = None  # a checkpoint may have brought another phase

    def expected_l0(self) -> torch.Tensor:
        """Sum over entries of P(gate ≠ 0) (Louizos et al., eq. 12)."""
        return torch.sigmoid(self.diff_log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def gated_diff(self) -> torch.Tensor:
        """The dense diff with deterministic gates (phase 1) or the fixed entries (phase 2)."""
        if self.fixed:
            return self._fixed_diff()
        return self.diff_delta * deterministic_gate(self.diff_log_alpha)

    def _kept_values(self) -> torch.Tensor:
        """Phase 2's entries: each kept entry's value at the switch plus what ``delta`` learnt since."""
        return self.diff_kept_value + (self.diff_delta.reshape(-1)[self.diff_kept] - self.diff_kept_delta)

    def _fixed_diff(self) -> torch.Tensor:
        values = self._kept_values()
        flat = torch.zeros(self.diff_delta.numel(), device=values.device, dtype=values.dtype)
        return flat.index_put((self.diff_kept,), values).view_as(self.diff_delta)

    def sparse_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices (sorted) and values of the kept entries: the fixed ones in phase 2, before it
        the ``keep`` largest |deterministic gated diff|."""
        if self.fixed:
            return self.diff_kept, self._kept_values()
        diff = self.gated_diff().flatten()
        indices = diff.abs().topk(self.keep, sorted=False).indices.sort().values
        return indices, diff[indices]

    def pruned_diff(self) -> torch.Tensor:
        if self.fixed:
            return self._fixed_diff()
        indices, values = self.sparse_entries()
        flat = torch.zeros(self.diff_delta.numel(), device=values.device, dtype=values.dtype)
        return flat.index_put((indices,), values).view_as(self.diff_delta)

    @torch.no_grad()
    def fix_mask(self, gathered: Callable[[list[nn.Parameter]], AbstractContextManager] = no_gather) -> None:
        """Start phase 2: freeze the projection of the current deterministic gated diff in the buffers.
        Parameters stay untouched; ``gathered`` makes them whole for the projection (ZeRO-3)."""
        with gathered([self.diff_delta, self.diff_log_alpha]):
            indices, values = self.sparse_entries()
            delta = self.diff_delta.reshape(-1)[indices]
        self.diff_kept.copy_(indices)
        self.diff_kept_value.copy_(values)
        self.diff_kept_delta.copy_(delta)
        self.diff_fixed.fill_(True)
        self._fixed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # through the module, so ZeRO-3 gathers its weight
        if self.merged:
            return out
        if self.fixed:
            return out + F.linear(x, self._fixed_diff())
        if not self.training:
            return out + F.linear(x, self.gated_diff() if self.dense else self.pruned_diff())
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


@contextmanager
def dense_diff(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` with the unprojected deterministic gated diff (phase 1's dense model) instead
    of its top-``target_sparsity`` projection; in phase 2 nothing changes. For measurements only."""
    layers = [m for _, m in _diff_layers(model)]
    for m in layers:
        m.dense = True
    try:
        yield
    finally:
        for m in layers:
            m.dense = False


class DiffPruning(PeftMethod):
    name = "diff_pruning"
    Config = DiffPruningConfig
    mergeable = True
    inference_overhead = (
        "none when merged; unmerged, every adapted layer scatters its kept entries into a dense diff and runs "
        "a second dense matmul with it (roughly doubling those layers' cost)"
    )
    paper = "Guo et al. 2021, arXiv:2012.07463"
    default_lr = 1e-3

    def _inject(self, model: nn.Module, config: DiffPruningConfig) -> None:
        patterns = config.target_modules or default_targets(model, ALL_LINEAR_IN_BLOCKS, "diff-pruning targets")
        for name, layer in find_modules(model, patterns):
            replace_module(model, name, DiffLinear(layer, config.target_sparsity, config.init_log_alpha))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.endswith((".diff_delta", ".diff_log_alpha"))

    def parameter_group(self, name: str, config: MethodConfig) -> str:
        """The gates' log_alpha train in group ``gates``; ``delta`` in ``adapter``."""
        return _GATES if name.endswith(".diff_log_alpha") else "adapter"

    def group_settings(self, config: DiffPruningConfig) -> dict[str, dict[str, float]]:
        return {_GATES: {"lr": config.gate_lr, "weight_decay": 0.0}}

    def begin_step(self, model: nn.Module, step: int, total_steps: int,
                   gathered: Callable[[list[nn.Parameter]], AbstractContextManager] = no_gather) -> None:
        """From step ``fix_mask_at × total_steps`` on: phase 2 (each layer fixes its mask once)."""
        if step < fix_mask_step(applied_config(model), total_steps):
            return
        for _, layer in _diff_layers(model):
            if not layer.fixed:
                layer.fix_mask(gathered)

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
        """``l0_weight`` × expected fraction of open gates, from the terms the last training forward
        recorded; without such a forward (outside ZeRO-3 only) it is computed from the parameters.
        None in phase 2, where the gates are fixed."""
        layers = [(n, m) for n, m in _diff_layers(model) if not m.fixed]
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
                state[name + _INDICES], state[name + _VALUES] = indices.long().clone(), values.detach()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Scatter the saved entries into ``delta``, pin the gates (open there, closed elsewhere) and
        fix the mask on them, so the loaded model is in phase 2 with exactly the saved diff."""
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
                order = indices.argsort()  # the buffers hold sorted indices, as fix_mask writes them
                layer.diff_kept.copy_(indices[order])
                layer.diff_kept_value.copy_(delta[indices[order]])
                layer.diff_kept_delta.copy_(delta[indices[order]])
                layer.diff_fixed.fill_(True)
                layer._fixed = True


def fix_mask_step(config: DiffPruningConfig, total_steps: int) -> int:
    """The first step of phase 2 (``total_steps`` when ``fix_mask_at`` is 1: never)."""
    return min(total_steps, math.ceil(config.fix_mask_at * total_steps))


def _diff_layers(model: nn.Module) -> list[tuple[str, DiffLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiffLinear)]
