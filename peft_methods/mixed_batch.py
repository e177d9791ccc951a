"""Mixed-adapter batches: one forward of a shared frozen base serves rows that use different adapters.

The S-LoRA / Punica idea, for every method whose adapter is a per-row change of the base. Each
method turns a saved adapter into :class:`RowDelta` s (``PeftMethod.row_deltas``); an
:class:`AdapterBank` keeps up to ``capacity`` adapters in slots and wraps the base modules they
touch in :class:`MixedModule` s, which add each row's delta during the one shared forward:

* ``LowRank`` (LoRA): gathered per row from slot-stacked ``A``/``B`` banks, two batched matmuls.
* ``BiasShift`` (BitFit): gathered per row from a slot-stacked bias bank.
* ``OutputAdapter`` (bottleneck adapters, AdaMix's average), ``RowOverride`` (FAR),
  ``SparseDelta`` (diff pruning): applied to each adapter's rows as a group.
* ``Prompt`` (prompt tuning, IPT): each row's virtual tokens in front of its own tokens.
* ``PrefixKV`` (prefix tuning): each row's key/value prefix in a shared KV cache, padded to the
  longest prefix and masked; the row's positions start after its own prefix, as when alone.
* task heads (``modules_to_save``): each adapter's copy runs on its rows; outputs are padded to
  the widest head with ``-inf``.

Rows whose adapter is ``None`` see the plain base. Nothing is merged into the base and no adapter
is swapped in per request, so results match running each request alone with its adapter.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods.api import MethodConfig
from peft_methods.registry import get_method
from peft_methods.targeting import ENCODER_FAMILIES, replace_module, task_head_names
from peft_methods.virtual_tokens import cache_kwarg


class NotServable(ValueError):
    """An adapter whose method cannot join mixed batches (or does not fit this base)."""


# -- what a method's adapter is, per module ---------------------------------------------------

@dataclass
class LowRank:
    """``y += up @ (down @ x)``; ``up`` already carries the method's scale."""
    module: str
    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)


@dataclass
class BiasShift:
    """``y += shift`` (a trained bias minus the base's)."""
    module: str
    shift: torch.Tensor  # (out,)


@dataclass
class OutputAdapter:
    """``y += up(act(down(y)))``: a residual bottleneck on the module's output."""
    module: str
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RowOverride:
    """Output units ``rows`` computed by ``weight``/``bias`` instead of the base's."""
    module: str
    rows: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class SparseDelta:
    """``y += x @ delta.T`` with a sparse weight difference."""
    module: str
    delta: torch.Tensor  # sparse COO (out, in)


@dataclass
class Prompt:
    """Virtual-token embeddings in front of the row's own tokens."""
    embeddings: torch.Tensor  # (n, hidden)
    module: str = ""


@dataclass
class PrefixKV:
    """Key/value prefixes for every attention layer, HF PEFT's layout (n, layers * 2 * kv_dim)."""
    table: torch.Tensor
    module: str = ""


RowDelta = LowRank | BiasShift | OutputAdapter | RowOverride | SparseDelta | Prompt | PrefixKV


# -- which rows use which slot, for the forward in progress ---------------------------------------

class RowRouter:
    """The slot of every row of the current batch; ``None`` outside a mixed forward."""

    def __init__(self, base_slot: int):
        self.base_slot = base_slot
        self.slots: torch.Tensor | None = None
        self.version = 0  # changes with every batch: modules cache per-batch gathers under it
        self._rows: dict[int, torch.Tensor] = {}

    def set(self, slots: torch.Tensor | None) -> None:
        self.slots = slots
        self.version += 1
        self._rows = {}
        if slots is not None:
            for s in slots.unique().tolist():
                self._rows[s] = (slots == s).nonzero().flatten()

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
        self.lora_down: torch.Tensor | None = None  # (capacity + 1, r_max, in); the last slot stays zero
        self.lora_up: torch.Tensor | None = None  # (capacity + 1, out, r_max)
        self.lowrank_slots: set[int] = set()
        self.bias_bank: torch.Tensor | None = None  # (capacity + 1, out)
        self.bias_slots: set[int] = set()
        self.grouped: dict[int, list[RowDelta]] = {}
        self.heads: dict[int, nn.Module] = {}
        self._gathered: tuple[int, tuple | None] | None = None  # (router version, this batch's plan)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # -- loading -----------------------------------------------------------------------------
    def add(self, slot: int, delta: RowDelta) -> None:
        self._gathered = None
        if isinstance(delta, LowRank):
            self._add_lowrank(slot, delta)
        elif isinstance(delta, BiasShift):
            if self.bias_bank is None:
                like = self.base_layer.weight
                self.bias_bank = torch.zeros(self.capacity + 1, delta.shift.shape[0], dtype=like.dtype, device=like.device)
            self.bias_bank[slot] = delta.shift
            self.bias_slots.add(slot)
        else:
            self.grouped.setdefault(slot, []).append(delta)

    def _add_lowrank(self, slot: int, delta: LowRank) -> None:
        r, (out_features, in_features) = delta.down.shape[0], (delta.up.shape[0], delta.down.shape[1])
        like = self.base_layer.weight
        self._gathered = None
        if self.lora_down is None or self.lora_down.shape[1] < r:
            down = torch.zeros(self.capacity + 1, r, in_features, dtype=like.dtype, device=like.device)
            up = torch.zeros(self.capacity + 1, out_features, r, dtype=like.dtype, device=like.device)
            if self.lora_down is not None:  # grow the rank: smaller adapters are zero-padded
                old = self.lora_down.shape[1]
                down[:, :old], up[:, :, :old] = self.lora_down, self.lora_up
            self.lora_down, self.lora_up = down, up
        self.lora_down[slot].zero_()
        self.lora_up[slot].zero_()
        self.lora_down[slot, :r] = delta.down
        self.lora_up[slot, :, :r] = delta.up
        self.lowrank_slots.add(slot)

    def set_head(self, slot: int, head: nn.Module) -> None:
        self._gathered = None
        self.heads[slot] = head

    def remove(self, slot: int) -> None:
        self._gathered = None
        if slot in self.lowrank_slots:
            self.lora_down[slot].zero_()
            self.lora_up[slot].zero_()
            self.lowrank_slots.discard(slot)
        if slot in self.bias_slots:
            self.bias_bank[slot].zero_()
            self.bias_slots.discard(slot)
        self.grouped.pop(slot, None)
        self.heads.pop(slot, None)

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.router.slots is None:
            return y
        plan = self._plan()
        if plan is None:
            return y
        down, up, bias, grouped, heads = plan
        batch = x.shape[0]
        if down is not None:
            low = torch.bmm(x.reshape(batch, -1, x.shape[-1]), down)
            y = torch.baddbmm(y.reshape(batch, -1, y.shape[-1]), low, up).reshape(y.shape)
        if bias is not None:
            y = y + bias.reshape(batch, *([1] * (y.dim() - 2)), -1)
        for rows, delta in grouped:
            y = y.index_copy(0, rows, _apply_grouped(delta, x.index_select(0, rows), y.index_select(0, rows)))
        if heads:
            y = self._heads(x, y, heads)
        return y

    def _plan(self) -> tuple | None:
        """What this module adds for the current batch, worked out once per batch: decoding steps
        reuse the rows' gathered A, B and biases. None when no row of the batch touches it."""
        router = self.router
        if self._gathered is not None and self._gathered[0] == router.version:
            return self._gathered[1]
        slots, active = router.slots, router.active
        down = up = bias = None
        if self.lowrank_slots.intersection(active):
            down, up = self.lora_down[slots].transpose(1, 2).contiguous(), self.lora_up[slots].transpose(1, 2).contiguous()
        if self.bias_slots.intersection(active):
            bias = self.bias_bank[slots]
        grouped = [(router.rows(s), d) for s in active for d in self.grouped.get(s, ())]
        heads = [s for s in active if s in self.heads]
        plan = None if down is None and bias is None and not grouped and not heads else (down, up, bias, grouped, heads)
        self._gathered = (router.version, plan)
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


def _apply_grouped(delta: RowDelta, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(delta, OutputAdapter):
        return y + F.linear(delta.activation(F.linear(y, delta.down_weight, delta.down_bias)), delta.up_weight, delta.up_bias)
    if isinstance(delta, RowOverride):
        return y.index_copy(-1, delta.rows, F.linear(x, delta.weight, delta.bias))
    if isinstance(delta, SparseDelta):
        flat = x.reshape(-1, x.shape[-1])
        return y + torch.sparse.mm(delta.delta, flat.T).T.reshape(y.shape)
    raise TypeError(f"no grouped application for {type(delta).__name__}")


# -- the bank: slots, LRU, and the batched forward --------------------------------------------------

@dataclass
class _Loaded:
    slot: int
    method: str
    prompt: torch.Tensor | None
    prefix: torch.Tensor | None = None
    modules: list[str] = field(default_factory=list)
    num_labels: int | None = None


class AdapterBank:
    """Up to ``capacity`` adapters on one shared base, least recently used evicted first.

    >>> bank = AdapterBank(base_model, capacity=32)                                   # doctest: +SKIP
    >>> bank.load("trec-lora", config, state)       # config + tensors as load_adapter reads them
    >>> logits = bank.forward_rows([ids_a, ids_b], ["trec-lora", None])               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, capacity: int = 32, padding_side: str | None = None):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.capacity = capacity
        self.router = RowRouter(base_slot=capacity)
        self.loaded: OrderedDict[Hashable, _Loaded] = OrderedDict()
        # Encoders pool the first position, decoders the last: padding goes where it is never pooled.
        self.padding_side = padding_side or ("right" if getattr(model.config, "model_type", None) in ENCODER_FAMILIES else "left")
        self._heads = task_head_names(model)
        # Prefill needs only the last position's logits (a 64-token prompt would otherwise pay the
        # vocabulary projection 64 times), where the model supports asking for that.
        import inspect

        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    # -- adapters ------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self.loaded

    def touch(self, key: Hashable) -> None:
        self.loaded.move_to_end(key)

    def load(self, key: Hashable, config: MethodConfig, state: dict[str, torch.Tensor]) -> list[Hashable]:
        """Load an adapter (its config and its tensors by parameter name) into a free slot,
        evicting the least recently used one when full; returns the keys evicted."""
        if key in self.loaded:
            self.touch(key)
            return []
        method = get_method(config.method)
        heads = list(config.modules_to_save) if config.modules_to_save is not None else self._heads
        head_state = {k: v for k, v in state.items() if any(k.startswith(h + ".") for h in heads)}
        try:
            deltas = method.row_deltas(self.model, config, {k: v for k, v in state.items() if k not in head_state})
        except NotImplementedError as e:
            raise NotServable(f"method {config.method!r} cannot serve in mixed batches: {e}") from None
        head_modules = self._build_heads(heads, head_state)
        evicted = []
        if len(self.loaded) >= self.capacity:
            old, _ = next(iter(self.loaded.items()))
            self.evict(old)
            evicted.append(old)
        slot = next(s for s in range(self.capacity) if s not in {v.slot for v in self.loaded.values()})
        entry = _Loaded(slot, config.method, None)
        modules = dict(self.model.named_modules())
        for delta in deltas:
            if isinstance(delta, Prompt):
                entry.prompt = delta.embeddings.to(self._embedding_weight())
                continue
            if isinstance(delta, PrefixKV):
                entry.prefix = delta.table.to(self._embedding_weight())
                continue
            self._mixed(delta.module, modules).add(slot, _to_device(delta, self._embedding_weight()))
            entry.modules.append(delta.module)
        for name, head in head_modules.items():
            self._mixed(name, modules).set_head(slot, head)
            entry.modules.append(name)
            entry.num_labels = _out_width(head)
        self.loaded[key] = entry
        return evicted

    def evict(self, key: Hashable) -> None:
        entry = self.loaded.pop(key)
        modules = dict(self.model.named_modules())
        for name in set(entry.modules):
            modules[name].remove(entry.slot)

    def num_labels(self, key: Hashable) -> int | None:
        return self.loaded[key].num_labels

    def prompt_length(self, key: Hashable | None) -> int:
        """Positions the adapter's virtual tokens (prompt or prefix) take before the row's own."""
        if key is None:
            return 0
        entry = self.loaded[key]
        return sum(t.shape[0] for t in (entry.prompt, entry.prefix) if t is not None)

    def _mixed(self, name: str, modules: dict[str, nn.Module]) -> MixedModule:
        module = modules.get(name)
        if module is None:
            raise NotServable(f"the adapter changes module {name!r}, which this base does not have")
        if isinstance(module, MixedModule):
            return module
        mixed = MixedModule(module, self.router, self.capacity)
        replace_module(self.model, name, mixed)
        modules[name] = mixed
        return mixed

    def _build_heads(self, heads: list[str], state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
        modules, built = dict(self.model.named_modules()), {}
        for name in heads:
            tensors = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if not tensors:
                continue
            base = modules[name].base_layer if isinstance(modules[name], MixedModule) else modules[name]
            head = copy.deepcopy(base)
            own = dict(head.named_parameters())
            if set(tensors) != set(own):
                raise NotServable(f"head {name!r}: the adapter holds {sorted(tensors)}, the base's head has {sorted(own)}")
            for k, t in tensors.items():  # a head of another width (another label count) is rebuilt to fit
                if own[k].shape != t.shape:
                    head = _resized_linear(head, tensors)
                    break
            else:
                head.load_state_dict(tensors)
            built[name] = head.eval().requires_grad_(False)
        return built

    def _embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    # -- batches -----------------------------------------------------------------------------------
    def pack(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None]) -> dict[str, torch.Tensor]:
        """inputs_embeds, attention_mask and position_ids for rows with their adapters' prompts in front.

        Padding goes on ``padding_side``; positions count only real (unmasked) positions, so a row
        gets the positions it would have alone."""
        embed = self.model.get_input_embeddings()
        weight = embed.weight
        rows = []
        for ids, key in zip(token_ids, keys):
            e = embed(torch.tensor(list(ids), dtype=torch.long, device=weight.device))
            prompt = self.loaded[key].prompt if key is not None else None
            rows.append(e if prompt is None else torch.cat([prompt, e]))
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, weight.shape[1], dtype=weight.dtype, device=weight.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=weight.device)
        for i, r in enumerate(rows):
            span = slice(width - r.shape[0], width) if self.padding_side == "left" else slice(0, r.shape[0])
            embeds[i, span], mask[i, span] = r, 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        prefixes = [self.loaded[key].prefix if key is not None else None for key in keys]
        if all(p is None for p in prefixes):
            return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        cache, prefix_mask, lengths = self._prefix_cache(prefixes)
        return {"inputs_embeds": embeds, "attention_mask": torch.cat([prefix_mask, mask], dim=1),
                "position_ids": positions + lengths[:, None], cache_kwarg(self.model): cache}

    def _prefix_cache(self, prefixes: list[torch.Tensor | None]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """A KV cache holding each row's prefix at the end of the longest one's span (masked before it)."""
        from transformers import DynamicCache

        from peft_methods.prefix_tuning import KVLayout

        layout, like = KVLayout.of(self.model.config), self._embedding_weight()
        width = max(p.shape[0] for p in prefixes if p is not None)
        keys = torch.zeros(layout.layers, len(prefixes), layout.heads, width, layout.head_dim, dtype=like.dtype, device=like.device)
        values = torch.zeros_like(keys)
        mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=like.device)
        lengths = torch.zeros(len(prefixes), dtype=torch.long, device=like.device)
        for row, table in enumerate(prefixes):
            if table is None:
                continue
            n = table.shape[0]
            kv = table.view(n, layout.layers, 2, layout.heads, layout.head_dim).permute(1, 2, 3, 0, 4)  # as prefix tuning lays it out
            keys[:, row, :, width - n:], values[:, row, :, width - n:] = kv[:, 0], kv[:, 1]
            mask[row, width - n:], lengths[row] = 1, n
        return DynamicCache([(keys[i], values[i]) for i in range(layout.layers)]), mask, lengths

    def slots(self, keys: Sequence[Hashable | None]) -> torch.Tensor:
        for key in keys:
            if key is not None:
                self.touch(key)
        slots = [self.capacity if key is None else self.loaded[key].slot for key in keys]
        return torch.tensor(slots, dtype=torch.long, device=self._embedding_weight().device)

    @torch.no_grad()
    def forward_rows(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None], **kwargs: Any) -> Any:
        """One forward over rows that use different adapters (``None`` = the plain base)."""
        inputs = self.pack(token_ids, keys)
        self.router.set(self.slots(keys))
        try:
            return self.model(**inputs, **kwargs)
        finally:
            self.router.set(None)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
        """Sample continuations for rows that use different adapters, in one batch with a KV cache.

        ``on_token(row, token_id)`` is called for every new token; returning True stops that row
        (e.g. a stop string). Rows also stop at EOS or their ``max_tokens``."""
        keys = [r.adapter for r in requests]
        inputs = self.pack([r.prompt_ids for r in requests], keys)
        self.router.set(self.slots(keys))
        eos = eos_ids(self.model)
        done = [r.max_tokens == 0 for r in requests]
        out: list[list[int]] = [[] for _ in requests]
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        try:
            from transformers import DynamicCache

            key = cache_kwarg(self.model)
            cache = inputs.pop(key, None) or DynamicCache()  # prefix tuning's rows bring theirs
            mask, positions = inputs["attention_mask"], inputs["position_ids"]
            result = self.model(**inputs, **{key: cache}, use_cache=True, **self._last_logits_only)
            while not all(done):
                logits = result.logits[:, -1].float()
                next_ids = []
                for i, req in enumerate(requests):
                    token = _sample(logits[i], req.temperature, req.top_p, generators[i]) if not done[i] else eos[0]
                    next_ids.append(token)
                    if done[i]:
                        continue
                    out[i].append(token)
                    stop = on_token(i, token) if on_token else False
                    if token in eos or len(out[i]) >= req.max_tokens or stop:
                        done[i] = True
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                ids = torch.tensor(next_ids, dtype=torch.long, device=mask.device)[:, None]
                result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    **{cache_kwarg(self.model): cache}, use_cache=True)
        finally:
            self.router.set(None)
        return out


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: Hashable | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return [-1]
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _out_width(head: nn.Module) -> int | None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _resized_linear(head: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if not isinstance(head, nn.Linear):
        raise NotServable(f"a {type(head).__name__} head of another shape cannot be rebuilt")
    weight = tensors["weight"]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors, dtype=weight.dtype, device=head.weight.device)
    new.load_state_dict(tensors)
    return new


def _to_device(delta: RowDelta, like: torch.Tensor) -> RowDelta:
    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return t.to(device=like.device, dtype=like.dtype)
        return t.to(device=like.device)

    return type(delta)(**{k: move(v) for k, v in vars(delta).items()})
