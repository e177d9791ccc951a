"""Mixed-adapter batches: one forward of a shared frozen base serves rows that use different adapters.

An :class:`AdapterBank` keeps up to ``capacity`` adapters in slots (least recently used evicted
first). Loading turns an adapter into its per-row deltas (``PeftMethod.row_deltas``, see
:mod:`peft_methods.row_deltas`) and hands each to the :class:`~peft_methods.mixed_module.MixedModule`
wrapping the base module it changes; input deltas (virtual tokens) stay with the slot and are
packed in front of the row's tokens. Rows whose adapter is ``None`` see the plain base. Nothing is
merged into the base and no adapter is swapped in per request, so results match running each
request alone with its adapter.

The bank lives where the base does: every tensor it holds for an adapter (stacked banks, grouped
deltas, heads, prompts, prefixes) is on the base's device in the base's dtype. Adapters arrive as
fp32 tensors on the host; the method turns them into deltas on the base's device in fp32, and only
those are cast, so a bf16 base gets deltas rounded once (LoRA's scale is applied before rounding).

The bank runs forwards, not decoding policies: :meth:`AdapterBank.forward_rows` is one forward,
:meth:`AdapterBank.decode` a batch stepped one token per row with a KV cache. Sampling, stop
strings and the generation loop live with the server (``orchestrator.serving.decoding``).
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from peft_methods.api import MethodConfig
from peft_methods.mixed_module import MixedModule, RowRouter
from peft_methods.registry import get_method
from peft_methods.row_deltas import InputDelta, RowDelta
from peft_methods.targeting import ENCODER_FAMILIES, replace_module, task_head_names
from peft_methods.virtual_tokens import cache_kwarg


class NotServable(ValueError):
    """An adapter whose method cannot join mixed batches (or does not fit this base)."""


class BankFull(RuntimeError):
    """Every slot holds an adapter that rows in flight use (pinned): nothing may be evicted now."""


@dataclass
class _Slot:
    """What one loaded adapter holds besides its modules' deltas."""

    slot: int
    method: str
    prompt: torch.Tensor | None = None  # (n, hidden), in front of the row's embeddings
    prefix: torch.Tensor | None = None  # (layers, 2, heads, n, head_dim), in front of its keys/values
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
        self.loaded: OrderedDict[Hashable, _Slot] = OrderedDict()
        # Encoders pool the first position, decoders the last: padding goes where it is never pooled.
        encoder = getattr(model.config, "model_type", None) in ENCODER_FAMILIES
        self.padding_side = padding_side or ("right" if encoder else "left")
        self._heads = task_head_names(model)
        self.cache_kwarg = cache_kwarg(model)
        # Prefill needs only the last position's logits (a 64-token prompt would otherwise pay the
        # vocabulary projection 64 times), where the model supports asking for that.
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only = {"logits_to_keep": 1} if keeps else {}

    # -- adapters ----------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self.loaded

    def touch(self, key: Hashable) -> None:
        self.loaded.move_to_end(key)

    def load(self, key: Hashable, config: MethodConfig, state: dict[str, torch.Tensor], *,
             pinned: frozenset | set = frozenset()) -> list[Hashable]:
        """Load an adapter (its config and its tensors by parameter name) into a free slot,
        evicting the least recently used one not in ``pinned`` (adapters rows in flight use) when full;
        returns the keys evicted. :class:`BankFull` when every slot is pinned."""
        if key in self.loaded:
            self.touch(key)
            return []
        if len(self.loaded) >= self.capacity and all(k in pinned for k in self.loaded):
            raise BankFull(f"all {self.capacity} adapter slots hold adapters in use")
        method = get_method(config.method)
        like = self._embedding_weight()
        # On the base's device, still in the file's precision: a method may combine them with the
        # base's own tensors (BitFit subtracts the base's bias) before the deltas are cast.
        state = {k: v.to(like.device) for k, v in state.items()}
        heads = list(config.modules_to_save) if config.modules_to_save is not None else self._heads
        head_state = {k: v for k, v in state.items() if any(k.startswith(h + ".") for h in heads)}
        try:
            deltas = method.row_deltas(self.model, config, {k: v for k, v in state.items() if k not in head_state})
        except NotImplementedError as e:
            raise NotServable(f"method {config.method!r} cannot serve in mixed batches: {e}") from None
        strange = [type(d).__name__ for d in deltas if not isinstance(d, (RowDelta, InputDelta))]
        if strange:
            raise NotServable(f"method {config.method!r}: row_deltas returned {strange}, not RowDelta or InputDelta")
        head_modules = self._build_heads(heads, head_state)
        evicted = []
        if len(self.loaded) >= self.capacity:
            old = next(k for k in self.loaded if k not in pinned)
            self.evict(old)
            evicted.append(old)
        used = {v.slot for v in self.loaded.values()}
        entry = _Slot(next(s for s in range(self.capacity) if s not in used), config.method)
        modules = dict(self.model.named_modules())
        inputs = [d.to(like) for d in deltas if isinstance(d, InputDelta)]
        entry.prompt = _cat([d.embeddings() for d in inputs], dim=0)
        entry.prefix = _cat([d.keys_values(self.model.config) for d in inputs], dim=3)
        for delta in deltas:
            if isinstance(delta, RowDelta):
                self._mixed(delta.module, modules).add(entry.slot, delta)  # cast to that module's dtype there
                entry.modules.append(delta.module)
        for name, head in head_modules.items():
            self._mixed(name, modules).set_head(entry.slot, head)
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
        prompt = entry.prompt.shape[0] if entry.prompt is not None else 0
        return prompt + (entry.prefix.shape[3] if entry.prefix is not None else 0)

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
                raise NotServable(f"head {name!r}: the adapter holds {sorted(tensors)}, the base's has {sorted(own)}")
            if any(own[k].shape != t.shape for k, t in tensors.items()):
                head = _resized_linear(head, tensors)  # a head of another width (another label count)
            else:
                head.load_state_dict(tensors)
            built[name] = head.eval().requires_grad_(False)
        return built

    def _embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    # -- batches -----------------------------------------------------------------------------------
    def pack(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None]) -> dict[str, Any]:
        """inputs_embeds, attention_mask and position_ids for rows with their adapters' prompts in
        front, plus a KV cache holding their prefixes when any row has one.

        Padding goes on ``padding_side``; positions count only real (unmasked) positions, so a row
        gets the positions it would have alone; after a prefix they start at its length."""
        embed = self.model.get_input_embeddings()
        weight = embed.weight
        flat = [t for ids in token_ids for t in ids]  # every row's tokens in one transfer and one lookup
        embedded = embed(_to_device(flat, weight.device))
        rows = []
        for e, key in zip(embedded.split([len(ids) for ids in token_ids]), keys):
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
        cache, prefix_mask, lengths = _prefix_cache(prefixes, weight)
        return {"inputs_embeds": embeds, "attention_mask": torch.cat([prefix_mask, mask], dim=1),
                "position_ids": positions + lengths[:, None], self.cache_kwarg: cache}

    def route(self, keys: Sequence[Hashable | None]) -> None:
        """Route the next forwards to the rows' slots (their adapters marked used). The router learns
        the slots from the host's copy: no wait for the device."""
        for key in keys:
            if key is not None:
                self.touch(key)
        host = [self.capacity if key is None else self.loaded[key].slot for key in keys]
        self.router.set(_to_device(host, self._embedding_weight().device), host)

    @torch.no_grad()
    def forward_rows(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None], **kwargs: Any) -> Any:
        """One forward over rows that use different adapters (``None`` = the plain base)."""
        inputs = self.pack(token_ids, keys)
        self.route(keys)
        try:
            return self.model(**inputs, **kwargs)
        finally:
            self.router.set(None)

    def decode(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None]) -> DecodingBatch:
        """Rows to decode together with a KV cache, as a context manager whose ``logits`` are the rows'
        first next-token logits (see :class:`DecodingBatch`, which rows may also join and leave)."""
        batch = DecodingBatch(self)
        batch.pending = (token_ids, keys)
        return batch


class DecodingBatch:
    """Rows decoded together over the bank with one KV cache, one token per row per step; rows join
    and leave between steps (continuous batching).

    ``join(token_ids, keys)`` runs the new rows' prompts in a forward of their own (a prompt never
    shares a forward with decoding rows), merges their cache into the batch's (left-padded to a common
    length: every row keeps its own positions and mask, so it computes what it would alone) and
    returns their next-token logits. ``step(next_ids)`` feeds one token to every row and returns the
    rows' next-token logits. ``keep(rows)`` drops the others and trims the cache's columns no kept row
    uses. Row order is join order; ``keys`` lists each row's adapter. The rows' adapters must stay
    loaded while they decode (the server pins them).

    >>> batch = DecodingBatch(bank)                                                    # doctest: +SKIP
    >>> logits = batch.join([ids_a, ids_b], ["trec-lora", None])
    >>> logits = batch.step(logits.argmax(-1))             # token ids stay on the device
    >>> batch.keep([1]); logits = batch.join([ids_c], ["qa-prefix"])
    """

    def __init__(self, bank: AdapterBank):
        self.bank = bank
        self.keys: list[Hashable | None] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns): grows by one column per step
        self.positions: torch.Tensor | None = None  # (rows, 1): each row's last position
        self.extent: list[int] = []  # host: the columns each row spans, counted from the right
        self.logits: torch.Tensor | None = None
        self.pending: tuple | None = None  # bank.decode's rows, joined on entering
        self._routed: list | None = None  # the keys the router holds

    def __len__(self) -> int:
        return len(self.keys)

    # -- as a context manager (bank.decode) ----------------------------------------------------------
    def __enter__(self) -> DecodingBatch:
        token_ids, keys = self.pending or ((), ())
        self.pending = None
        try:
            self.logits = self.join(token_ids, keys)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the router (the rows' adapters)."""
        self.bank.router.set(None)
        self._routed = None

    # -- rows join, step and leave ----------------------------------------------------------------------
    @torch.no_grad()
    def join(self, token_ids: Sequence[Sequence[int]], keys: Sequence[Hashable | None]) -> torch.Tensor:
        """Prefill new rows and add them to the batch; their next-token logits (float32, on the device).
        If the prompts' forward fails, the batch is as it was."""
        bank, keys = self.bank, list(keys)
        if not keys:
            return torch.empty(0, 0)
        inputs = bank.pack(token_ids, keys)
        self._route(keys)
        try:
            cache = inputs.pop(bank.cache_kwarg, None)  # rows with a prefix bring theirs
            cache = DynamicCache() if cache is None else cache
            result = bank.model(**inputs, **{bank.cache_kwarg: cache}, use_cache=True, **bank.last_logits_only)
        finally:
            self._routed = None  # routed to the new rows alone: route again before the next step
        mask, width = inputs["attention_mask"], inputs["attention_mask"].shape[1]
        prefix = width - inputs["inputs_embeds"].shape[1]
        extent = []
        for ids, key in zip(token_ids, keys):
            entry = bank.loaded[key] if key is not None else None
            own = len(ids) + (entry.prompt.shape[0] if entry is not None and entry.prompt is not None else 0)
            n_prefix = entry.prefix.shape[3] if entry is not None and entry.prefix is not None else 0
            extent.append(width - (prefix - n_prefix) if n_prefix else own)  # a prefix sits left of any padding
        self._merge(cache, mask, inputs["position_ids"][:, -1:], keys, extent)
        return result.logits[:, -1].float()

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Append one token to every row (a tensor of ids, best already on the device, or a list);
        returns the rows' next-token logits (float32, on the device)."""
        if not self.keys:
            raise ValueError("no rows to step")
        self._route(self.keys)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1
        self.extent = [e + 1 for e in self.extent]
        if isinstance(next_ids, torch.Tensor):
            ids = next_ids.to(self.mask.device, torch.long, non_blocking=True).reshape(-1, 1)
        else:
            ids = _to_device(list(next_ids), self.mask.device)[:, None]
        result = self.bank.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions,
                                 **{self.bank.cache_kwarg: self.cache}, use_cache=True)
        self.logits = result.logits[:, -1].float()
        return self.logits

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the current rows, in the order given); the columns no kept
        row spans are cut from the cache."""
        rows = list(rows)
        if rows == list(range(len(self.keys))):
            return
        self.keys = [self.keys[i] for i in rows]
        self.extent = [self.extent[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.positions = None
            self.close()
            return
        index = _to_device(rows, self.mask.device)
        cut = self.mask.shape[1] - max(self.extent)
        self.mask = self.mask.index_select(0, index)[:, cut:]
        self.positions = self.positions.index_select(0, index)
        _set_layers(self.cache, [(k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:])
                                 for k, v in _layers(self.cache)])
        self._routed = None

    # -- internals -------------------------------------------------------------------------------------------
    def _route(self, keys: list) -> None:
        if self._routed != keys:
            self.bank.route(keys)
            self._routed = list(keys)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, keys: list,
               extent: list[int]) -> None:
        if not self.keys:
            self.cache, self.mask, self.positions = cache, mask, positions
            self.keys, self.extent = keys, extent
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        _set_layers(self.cache, [(torch.cat([left_pad(k0, 2), left_pad(k1, 2)]),
                                  torch.cat([left_pad(v0, 2), left_pad(v1, 2)]))
                                 for (k0, v0), (k1, v1) in zip(_layers(self.cache), _layers(cache))])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.keys, self.extent = self.keys + keys, self.extent + extent
        self._routed = None


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, (rows, heads, columns, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _set_layers(cache: DynamicCache, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace each layer's keys and values in place (a new cache would allocate each layer afresh)."""
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.keys, layer.values = keys, values


def _prefix_cache(prefixes: list[torch.Tensor | None],
                  like: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """A KV cache holding each row's prefix at the end of the longest one's span (masked before it)."""
    layers, _, heads, _, head_dim = next(p for p in prefixes if p is not None).shape
    width = max(p.shape[3] for p in prefixes if p is not None)
    keys = torch.zeros(layers, len(prefixes), heads, width, head_dim, dtype=like.dtype, device=like.device)
    values = torch.zeros_like(keys)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=like.device)
    lengths = torch.zeros(len(prefixes), dtype=torch.long, device=like.device)
    for row, kv in enumerate(prefixes):
        if kv is None:
            continue
        n = kv.shape[3]
        keys[:, row, :, width - n:], values[:, row, :, width - n:] = kv[:, 0], kv[:, 1]
        mask[row, width - n:], lengths[row] = 1, n
    return DynamicCache([(keys[i], values[i]) for i in range(layers)]), mask, lengths


def _to_device(ids: list[int], device: torch.device) -> torch.Tensor:
    """Host ints as a long tensor on ``device``, copied without waiting for the device's queued work
    (a blocking copy to a GPU first waits for everything queued before it)."""
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)


def _cat(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present, dim=dim) if present else None


def _out_width(head: nn.Module) -> int | None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _resized_linear(head: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if not isinstance(head, nn.Linear):
        raise NotServable(f"a {type(head).__name__} head of another shape cannot be rebuilt")
    weight = tensors["weight"]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors, dtype=head.weight.dtype,
                    device=head.weight.device)  # the base's dtype, not the file's
    new.load_state_dict(tensors)
    return new
