"""Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190).

Every attention layer gets ``num_virtual_tokens`` trainable key/value pairs that all real tokens
attend to; the base model stays frozen. They reach the layers as a pre-filled KV cache, built by a
forward pre-hook on each call (see :mod:`peft_methods.virtual_tokens`), with the attention mask
widened to cover them; position ids of real tokens start after the prefix, as in HF PEFT.

With ``prefix_projection`` the prefix is re-parametrised during training as an MLP of a small
embedding, as the paper does (it found optimising the prefix directly unstable and slightly worse with
GPT-2/BART over many epochs). It is off by default here: on MiniLM in short jobs the MLP learned nothing
beyond the task head at any learning rate we tried, the direct prefix did (docs/methods.md has the
numbers). Either way the prefix starts as the keys/values the model computes for random
vocabulary tokens (the paper's initialisation with real words' activations, which it found to matter
most with little data): without the MLP they are the prefix itself; with it, a frozen per-token
offset added to the MLP's output makes the first prefix exactly those activations, so the MLP learns
the change from them (our way of combining the two; the paper does not say how it combines them).
The saved adapter always holds the computed prefix,
``prompt_embeddings`` of shape (num_virtual_tokens, num_layers * 2 * kv_dim) in HF PEFT's layout,
so loading gives plain prefixes and ``peft.PeftModel.from_pretrained`` reads our adapters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.row_deltas import PrefixKV
from peft_methods.virtual_tokens import (
    PROMPT_KEY,
    KVLayout,
    batch_size,
    cache_kwarg,
    extend_attention_mask,
    from_hf_keys,
    hf_prompt_learning_config,
    install_input_hook,
    load_prompt_state,
    prefix_keys_values,
    to_hf_keys,
)

_ATTR = "peft_prefix"  # the module holding the prefix on the model


class PrefixTuningConfig(MethodConfig):
    method: Literal["prefix_tuning"] = Field(default="prefix_tuning", description="Selects prefix tuning.")
    num_virtual_tokens: int = Field(
        default=20, gt=0, le=1024, description="Trainable key/value positions added in front of every attention layer."
    )
    prefix_projection: bool = Field(
        default=False,
        description=(
            "Train the prefix as an MLP of a small per-token embedding, as Li & Liang do (more parameters while "
            "training; the MLP is folded away when the adapter is saved). Off by default: on MiniLM it learned "
            "nothing beyond the head at any lr from 3e-4 to 3e-2 in a 90-step job, where the direct prefix at "
            "0.03 did (docs/methods.md); with it on, set training.lr near 5e-4."
        ),
    )
    encoder_hidden_size: int = Field(
        default=128, gt=0, le=65536, description="Hidden width of the re-parametrisation MLP (prefix_projection only)."
    )


class Prefix(nn.Module):
    """The prefix itself, one row per virtual token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.prefix = nn.Parameter(table)

    def table(self) -> torch.Tensor:
        return self.prefix

    def forward(self) -> torch.Tensor:
        # Call the module (so ZeRO-3 gathers its parameters) and return a copy: the gathered buffer
        # may be reused once the call returns.
        return self.table().clone()


class ProjectedPrefix(nn.Module):
    """prefix = W2 tanh(W1 e + b1) + b2 + c: the MLP learns the change from ``start``, the frozen offset
    ``c`` (a buffer, fixed when built) making the first prefix exactly ``start``. Parameters sit on this
    module directly, so one call gathers them all under ZeRO-3 and ``table()`` can be computed without
    module hooks when saving."""

    def __init__(self, start: torch.Tensor, layout: KVLayout, hidden: int):
        super().__init__()
        factory = {"device": start.device, "dtype": start.dtype}
        first, second = nn.Linear(layout.token_dim, hidden, **factory), nn.Linear(hidden, layout.width, **factory)
        self.embedding = nn.Parameter(torch.randn(start.shape[0], layout.token_dim, **factory))
        self.w1, self.b1 = first.weight, first.bias
        self.w2, self.b2 = second.weight, second.bias
        self.register_buffer("offset", torch.zeros_like(start))
        with torch.no_grad():
            self.offset.copy_(start - self.table())

    def table(self) -> torch.Tensor:
        return F.linear(torch.tanh(F.linear(self.embedding, self.w1, self.b1)), self.w2, self.b2) + self.offset

    def forward(self) -> torch.Tensor:
        return self.table()


class PrefixTuning(PeftMethod):
    name = "prefix_tuning"
    Config = PrefixTuningConfig
    mergeable = False
    inference_overhead = (
        "every attention layer attends over num_virtual_tokens extra keys/values (a small cost per token), "
        "and real tokens' positions start after the prefix, shortening the usable length by that much"
    )
    paper = "Li & Liang 2021, arXiv:2101.00190"
    default_lr = 3e-2

    def _inject(self, model: nn.Module, config: PrefixTuningConfig) -> None:
        layout, n, key = KVLayout.of(model.config), config.num_virtual_tokens, cache_kwarg(model)
        real = _real_token_prefix(model, n, layout, key)  # also checks that the layout fits the model
        if config.prefix_projection:
            setattr(model, _ATTR, ProjectedPrefix(real, layout, config.encoder_hidden_size))
        else:
            setattr(model, _ATTR, Prefix(real))
        install_input_hook(model, lambda m, kwargs: _add_prefix(m, kwargs, n, layout, key))

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.startswith(_ATTR + ".")

    def row_deltas(self, base: nn.Module, config: PrefixTuningConfig, state: dict[str, torch.Tensor]) -> list[PrefixKV]:
        return [PrefixKV(state[PROMPT_KEY])]

    # -- saved: the computed prefix (MLP folded away) plus the task head ---------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in super().adapter_state_dict(model).items() if not self.is_adapter_parameter(k, None)}
        with torch.no_grad():
            return {PROMPT_KEY: getattr(model, _ATTR).table().detach(), **state}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Loads into plain prefixes, also when the config trained with prefix_projection."""
        current = getattr(model, _ATTR)
        like = next(current.parameters())

        def set_prompt(t: torch.Tensor) -> None:
            setattr(model, _ATTR, Prefix(t.detach().to(device=like.device, dtype=like.dtype).clone()))

        layout = KVLayout.of(model.config)
        load_prompt_state(self, model, state, {PROMPT_KEY: ((current.table().shape[0], layout.width), set_prompt)})

    def to_file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_hf_keys(state)

    def from_file_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_hf_keys(self.name, tensors)

    def adapter_config(self, model: nn.Module, config: PrefixTuningConfig) -> dict[str, Any]:
        """HF PEFT's PrefixTuningConfig; prefix_projection is false because the saved prefix is folded."""
        layout = KVLayout.of(model.config)
        return {
            **hf_prompt_learning_config(
                model, "PREFIX_TUNING", config.num_virtual_tokens, layout.token_dim, layout.heads
            ),
            "encoder_hidden_size": config.encoder_hidden_size,
            "prefix_projection": False,
        }


def _cache_of(table: torch.Tensor, batch: int, layout: KVLayout) -> Any:
    from transformers import DynamicCache

    kv = prefix_keys_values(table, layout)
    shape = (batch, layout.heads, table.shape[0], layout.head_dim)
    return DynamicCache([(kv[i, 0].expand(shape), kv[i, 1].expand(shape)) for i in range(layout.layers)])


@torch.no_grad()
def _real_token_prefix(model: nn.Module, n: int, layout: KVLayout, key: str) -> torch.Tensor:
    """Keys/values the model itself computes for ``n`` random vocabulary tokens: the paper's advice to
    start from real words' activations rather than noise. Run once, before the hook exists."""
    from transformers import DynamicCache

    weight = model.get_input_embeddings().weight
    ids = torch.randint(weight.shape[0], (1, n), device=weight.device)
    cache, was_training = DynamicCache(), model.training
    model.eval()
    try:
        model.base_model(input_ids=ids, **{key: cache})
    finally:
        model.train(was_training)
    entries = [tuple(entry)[:2] for entry in cache]
    expected = (1, layout.heads, n, layout.head_dim)
    if len(entries) != layout.layers or any(k is None or tuple(k.shape) != expected for k, _ in entries):
        got = [None if k is None else tuple(k.shape) for k, _ in entries]
        raise ValueError(
            f"prefix_tuning: {type(model).__name__}'s attention caches keys shaped {got[:2]}... over {len(got)} "
            f"layers, expected {layout.layers} layers of {expected}; its attention layout is not supported"
        )
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in entries])  # (layers, 2, heads, n, head_dim)
    return kv.permute(3, 0, 1, 2, 4).reshape(n, layout.width).to(weight.dtype).clone()


def _add_prefix(model: nn.Module, kwargs: dict[str, Any], n: int, layout: KVLayout, key: str) -> None:
    if (
        model.training
        and torch.is_grad_enabled()
        and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ):
        # transformers' checkpointed layers drop the KV cache, which would silently drop the prefix.
        raise ValueError("prefix_tuning does not work with gradient checkpointing; disable it")
    kwargs[key] = _cache_of(getattr(model, _ATTR)(), batch_size(kwargs), layout)
    extend_attention_mask(kwargs, n)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
