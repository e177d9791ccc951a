"""One base module shared by rows that use different adapters: the S-LoRA / Punica idea.

A :class:`MixedModule` wraps a frozen base module and holds every loaded adapter's deltas for it.
The one shared forward computes the base output for the whole batch, then each delta changes the
rows of its adapter: banked kinds all at once for the batch, grouped kinds on their adapter's rows
(see :mod:`peft_methods.row_deltas`). Task heads (``modules_to_save``) are handled here too: each
adapter's copy runs on its rows, and outputs are padded to the widest head with ``-inf``.

A :class:`RowRouter` says which slot each row of the current batch uses; all wrapped modules of one
model share it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_methods.row_deltas import DeltaBank, RowDelta


class RowRouter:
    """The slot of every row of the current batch; ``None`` outside a mixed forward."""

    def __init__(self, base_slot: int):
        self.base_slot = base_slot
        self.slots: torch.Tensor | None = None
        self.version = 0  # changes with every batch: modules cache per-batch gathers under it
        self.cache_plans = True  # False where a forward may run again on the same batch (activation checkpointing)
        self._rows: dict[int, torch.Tensor] = {}

    def set(self, slots: torch.Tensor | None, host: list[int] | None = None) -> None:
        """Route a batch (one slot per row, on the batch's device) or end it (None). The rows of each
        slot are found on the host from ``host`` (the same slots as host ints, when the caller has them)
        or else from one copy of ``slots``, not by a device search per slot."""
        self.slots = slots
        self.version += 1
        self._rows = {}
        if slots is not None:
            by_slot: dict[int, list[int]] = {}
            for row, s in enumerate(host if host is not None else slots.tolist()):
                by_slot.setdefault(s, []).append(row)
            self._rows = {s: torch.tensor(rows, dtype=torch.long).to(slots.device, non_blocking=True)
                          for s, rows in sorted(by_slot.items())}

    def rows(self, slot: int) -> torch.Tensor | None:
        return self._rows.get(slot)

    @property
    def active(self) -> list[int]:
        return [s for s in self._rows if s != self.base_slot]


class MixedModule(nn.Module):
    """A frozen base module plus every loaded adapter's delta for it, each applied to its rows."""

    def __init__(self, base_layer: nn.Module, router: RowRouter, capacity: int):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.capacity = capacity
        self.banks: dict[type[DeltaBank], DeltaBank] = {}
        self.grouped: dict[int, list[RowDelta]] = {}
        self.heads: dict[int, nn.Module] = {}
        self._planned: tuple[int, tuple | None] | None = None  # (router version, this batch's plan)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # -- loading -------------------------------------------------------------------------------------
    def add(self, slot: int, delta: RowDelta) -> None:
        """Hold ``delta`` for ``slot``'s rows, on the base module's device and in its dtype."""
        self._planned = None
        like = _parameter_like(self.base_layer)
        delta = delta.to(like)
        if delta.bank is None:
            self.grouped.setdefault(slot, []).append(delta)
            return
        bank = self.banks.get(delta.bank)
        if bank is None:
            bank = self.banks[delta.bank] = delta.bank(self.capacity, like)
        bank.add(slot, delta)

    def set_head(self, slot: int, head: nn.Module) -> None:
        self._planned = None
        self.heads[slot] = head

    def remove(self, slot: int) -> None:
        self._planned = None
        for bank in self.banks.values():
            if slot in bank.slots:
                bank.remove(slot)
        self.grouped.pop(slot, None)
        self.heads.pop(slot, None)

    def clear(self) -> None:
        """Drop every slot's delta and head at once (training rebuilds them from its parameters each step,
        so their gradients flow; zeroing slots in place would reach into the last step's graph)."""
        self._planned = None
        self.banks.clear()
        self.grouped.clear()
        self.heads.clear()

    # -- the forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.router.slots is None:
            return y
        plan = self._plan()
        if plan is None:
            return y
        banks, grouped, heads = plan
        for bank, gathered in banks:
            y = bank.apply(gathered, x, y)
        for rows, delta in grouped:
            y = y.index_copy(0, rows, delta.apply(self.base_layer, x.index_select(0, rows), y.index_select(0, rows)))
        if heads:
            y = self._heads(x, y, heads)
        return y

    def _plan(self) -> tuple | None:
        """What this module adds for the current batch, worked out once per batch: decoding steps
        reuse the rows' gathered operands. None when no row of the batch touches it."""
        router = self.router
        if self._planned is not None and self._planned[0] == router.version and router.cache_plans:
            return self._planned[1]
        active = router.active
        touched = [b for b in self.banks.values() if b.slots.intersection(active)]
        banks: list[tuple[DeltaBank, Any]] = [(b, b.gather(router.slots)) for b in touched]
        grouped = [(router.rows(s), d) for s in active for d in self.grouped.get(s, ())]
        heads = [s for s in active if s in self.heads]
        plan = (banks, grouped, heads) if banks or grouped or heads else None
        self._planned = (router.version, plan)
        return plan

    def _heads(self, x: torch.Tensor, y: torch.Tensor, slots: list[int]) -> torch.Tensor:
        outputs = {s: self.heads[s](x.index_select(0, self.router.rows(s))) for s in slots}
        width = max([y.shape[-1], *(o.shape[-1] for o in outputs.values())])
        padded = torch.full((*y.shape[:-1], width), float("-inf"), dtype=y.dtype, device=y.device)
        padded[..., : y.shape[-1]] = y
        for s, out in outputs.items():
            rows = self.router.rows(s)
            block = torch.full((rows.numel(), *y.shape[1:-1], width), float("-inf"), dtype=y.dtype, device=y.device)
            block[..., : out.shape[-1]] = out
            padded = padded.index_copy(0, rows, block)
        return padded


def _parameter_like(module: nn.Module) -> torch.Tensor:
    """The tensor whose dtype and device a bank for ``module`` takes: its weight, else any parameter."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(module.parameters())
