"""Per-row deltas: a saved adapter as changes of the plain base that a mixed batch applies to the
rows using it (``PeftMethod.row_deltas`` returns them; :mod:`peft_methods.adapter_bank` serves them).

The protocol is open: a delta applies itself, so a method (built in or a plugin) can bring a kind
of its own and nothing that serves it changes.

* :class:`RowDelta` changes one module. By default it is *grouped*: ``apply(base_layer, x, y)``
  runs on its adapter's rows only (``x`` their input, ``y`` their base output). A kind that stacks
  well names a :class:`DeltaBank` subclass in ``bank``; the module then keeps one bank per kind
  holding every slot's delta and applies them all to the whole batch in one go.
* :class:`InputDelta` changes a row's inputs instead (virtual tokens in front of its own): prompt
  embeddings and/or key/value prefixes, which the bank packs into the batch.

Built-in kinds: ``LowRank`` (LoRA) and ``BiasShift`` (BitFit) use banks; ``OutputAdapter``
(bottleneck, AdaMix), ``OwnParameters`` (bottleneck's trained norms), ``RowOverride`` (FAR) and
``SparseDelta`` (diff pruning) are grouped;
``Prompt`` (prompt tuning, IPT) and ``PrefixKV`` (prefix tuning) are input deltas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods.virtual_tokens import KVLayout, prefix_keys_values

_D = TypeVar("_D")


def moved(delta: _D, like: torch.Tensor) -> _D:
    """A copy of a dataclass delta with its tensors on ``like``'s device (floating ones in its dtype)."""

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(device=like.device, dtype=like.dtype)
        return value.to(device=like.device)

    fields = [f.name for f in dataclasses.fields(delta) if f.init]
    return dataclasses.replace(delta, **{name: move(getattr(delta, name)) for name in fields})


class DeltaBank:
    """Every slot's delta of one kind for one module, stacked so a batch applies them in one op.

    Slot ``capacity`` belongs to rows without an adapter and always stays zero. ``gather`` picks the
    operands for a batch (the caller keeps them for the batch's decoding steps); ``apply`` uses them.
    """

    def __init__(self, capacity: int, like: torch.Tensor):
        self.capacity, self.like = capacity, like
        self.slots: set[int] = set()

    def add(self, slot: int, delta: RowDelta) -> None:
        raise NotImplementedError

    def remove(self, slot: int) -> None:
        raise NotImplementedError

    def gather(self, slots: torch.Tensor) -> Any:
        raise NotImplementedError

    def apply(self, gathered: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class RowDelta:
    """A change of module ``module`` for the rows of one adapter; see the module docstring."""

    module: str
    bank: ClassVar[type[DeltaBank] | None] = None  # None: applied per adapter, to its rows

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output for this adapter's rows: ``x`` their input, ``y`` the base layer's output for them."""
        raise NotImplementedError(f"{type(self).__name__} names a bank; it is not applied per group")

    def to(self, like: torch.Tensor) -> RowDelta:
        return moved(self, like)


class InputDelta:
    """A change of a row's inputs: positions in front of its own tokens. A kind returns what it adds."""

    def embeddings(self) -> torch.Tensor | None:
        """(n, hidden) embeddings placed in front of the row's token embeddings."""
        return None

    def keys_values(self, model_config: Any) -> torch.Tensor | None:
        """(layers, 2, heads, n, head_dim) keys/values every attention layer sees before the row's own."""
        return None

    def to(self, like: torch.Tensor) -> InputDelta:
        return moved(self, like)


# -- banked kinds ---------------------------------------------------------------------------------

class LowRankBank(DeltaBank):
    """Slot-stacked ``A``/``B``, zero-padded to the largest rank; a batch is two batched matmuls."""

    def __init__(self, capacity: int, like: torch.Tensor):
        super().__init__(capacity, like)
        self.down: torch.Tensor | None = None  # (capacity + 1, r_max, in)
        self.up: torch.Tensor | None = None  # (capacity + 1, out, r_max)

    def add(self, slot: int, delta: LowRank) -> None:
        r, (out_features, in_features) = delta.down.shape[0], (delta.up.shape[0], delta.down.shape[1])
        if self.down is None or self.down.shape[1] < r:
            factory = {"dtype": self.like.dtype, "device": self.like.device}
            down = torch.zeros(self.capacity + 1, r, in_features, **factory)
            up = torch.zeros(self.capacity + 1, out_features, r, **factory)
            if self.down is not None:  # grow the rank: smaller adapters are zero-padded
                old = self.down.shape[1]
                down[:, :old], up[:, :, :old] = self.down, self.up
            self.down, self.up = down, up
        self.remove(slot)
        self.down[slot, :r] = delta.down
        self.up[slot, :, :r] = delta.up
        self.slots.add(slot)

    def remove(self, slot: int) -> None:
        if self.down is not None:
            self.down[slot].zero_()
            self.up[slot].zero_()
        self.slots.discard(slot)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down[slots].transpose(1, 2).contiguous(), self.up[slots].transpose(1, 2).contiguous()

    def apply(self, gathered: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        down, up = gathered
        batch = x.shape[0]
        low = torch.bmm(x.reshape(batch, -1, x.shape[-1]), down)
        return torch.baddbmm(y.reshape(batch, -1, y.shape[-1]), low, up).reshape(y.shape)


@dataclass
class LowRank(RowDelta):
    """``y += up @ (down @ x)``; ``up`` already carries the method's scale."""

    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    bank: ClassVar[type[DeltaBank]] = LowRankBank


class BiasBank(DeltaBank):
    """Slot-stacked bias shifts; a batch adds each row's own."""

    def __init__(self, capacity: int, like: torch.Tensor):
        super().__init__(capacity, like)
        self.shifts: torch.Tensor | None = None  # (capacity + 1, out)

    def add(self, slot: int, delta: BiasShift) -> None:
        if self.shifts is None:
            factory = {"dtype": self.like.dtype, "device": self.like.device}
            self.shifts = torch.zeros(self.capacity + 1, delta.shift.shape[0], **factory)
        self.shifts[slot] = delta.shift
        self.slots.add(slot)

    def remove(self, slot: int) -> None:
        if self.shifts is not None:
            self.shifts[slot].zero_()
        self.slots.discard(slot)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        return self.shifts[slots]

    def apply(self, gathered: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + gathered.reshape(y.shape[0], *([1] * (y.dim() - 2)), -1)


@dataclass
class BiasShift(RowDelta):
    """``y += shift`` (a trained bias minus the base's)."""

    shift: torch.Tensor  # (out,)
    bank: ClassVar[type[DeltaBank]] = BiasBank


# -- grouped kinds --------------------------------------------------------------------------------

@dataclass
class OutputAdapter(RowDelta):
    """``y += up(act(down(y)))``: a residual bottleneck on the module's output."""

    down_weight: torch.Tensor
    down_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(F.linear(y, self.down_weight, self.down_bias))
        return y + F.linear(hidden, self.up_weight, self.up_bias)


@dataclass
class OwnParameters(RowDelta):
    """The module run on the rows' input with the adapter's own ``weight`` / ``bias`` (None: the base's):
    e.g. a trained LayerNorm or RMSNorm, recomputed by the module's own forward, so exactly what the adapted
    model computes (no division by the base's weight) and differentiable in the given tensors."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        own = {k: v for k, v in (("weight", self.weight), ("bias", self.bias)) if v is not None}
        return torch.func.functional_call(base_layer, own, (x,))


@dataclass
class RowOverride(RowDelta):
    """Output units ``rows`` computed by ``weight``/``bias`` instead of the base's."""

    rows: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.index_copy(-1, self.rows, F.linear(x, self.weight, self.bias))


@dataclass
class SparseDelta(RowDelta):
    """``y += x @ delta.T`` with a sparse weight difference."""

    delta: torch.Tensor  # sparse COO (out, in)

    def apply(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return y + torch.sparse.mm(self.delta, flat.T).T.reshape(y.shape)


# -- input kinds ----------------------------------------------------------------------------------

@dataclass
class Prompt(InputDelta):
    """Virtual-token embeddings in front of the row's own tokens."""

    table: torch.Tensor  # (n, hidden)

    def embeddings(self) -> torch.Tensor:
        return self.table


@dataclass
class PrefixKV(InputDelta):
    """Key/value prefixes for every attention layer, HF PEFT's layout (n, layers * 2 * kv_dim)."""

    table: torch.Tensor

    def keys_values(self, model_config: Any) -> torch.Tensor:
        return prefix_keys_values(self.table, KVLayout.of(model_config))
