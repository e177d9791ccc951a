"""What prompt tuning and prefix tuning share: rewriting a forward's inputs for virtual tokens.

``apply`` changes the model in place, so there is no wrapper whose ``forward`` could add the
virtual tokens. Instead a forward pre-hook on the top-level model rewrites the call's keyword
arguments (input_ids -> inputs_embeds with prompts, longer attention_mask, ...) before the model
sees them. Both methods save in HF PEFT's prompt-learning layout: one ``prompt_embeddings``
tensor plus the task head under ``base_model.`` (HF PEFT keeps no ``.model`` level for them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_methods.api import check_state_keys
from peft_methods.targeting import hf_task_type

PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # HF PEFT's prefix for modules_to_save of prompt-learning adapters
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5.x renamed past_key_values to cache


@dataclass(frozen=True)
class KVLayout:
    """How one layer's keys/values are shaped: HF PEFT's token_dim is heads * head_dim."""

    layers: int
    heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def width(self) -> int:  # one virtual token's keys and values across all layers
        return self.layers * 2 * self.token_dim

    @classmethod
    def of(cls, config: Any) -> KVLayout:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, heads, head_dim)


def prefix_keys_values(table: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A saved prefix (n, layers * 2 * kv_dim) as (layers, 2, heads, n, head_dim): keys and values per
    layer, as a KV cache holds them. HF PEFT's layout is per token, layer-major, then key/value, then
    heads, then head_dim; prefix tuning's training hook and the mixed-batch bank both read it here."""
    return table.view(table.shape[0], layout.layers, 2, layout.heads, layout.head_dim).permute(1, 2, 3, 0, 4)


def install_input_hook(model: nn.Module, rewrite: Callable[[nn.Module, dict[str, Any]], None]) -> None:
    """Run ``rewrite(model, kwargs)`` before every forward, with positional arguments made keywords."""
    names = [n for n in inspect.signature(model.forward).parameters if n not in ("args", "kwargs")]

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if len(args) > len(names):
            raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
        kwargs = dict(kwargs)
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(module).__name__}.forward got multiple values for {name!r}")
            kwargs[name] = value
        if any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
            # A cache means incremental decoding: the virtual tokens would be added a second time.
            raise NotImplementedError("virtual-token methods do not support forwards with a KV cache (generate)")
        rewrite(module, kwargs)
        return (), kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version's backbone takes its KV cache."""
    params = inspect.signature(model.base_model.forward).parameters
    return next((k for k in _CACHE_KWARGS if k in params), "past_key_values")


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("the forward needs input_ids or inputs_embeds")


def prepend(tensor: torch.Tensor, n: int, fill: int | float) -> torch.Tensor:
    """``tensor`` (B, T, ...) with ``n`` positions of ``fill`` added in front along dim 1."""
    pad = torch.full((tensor.shape[0], n, *tensor.shape[2:]), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def extend_attention_mask(kwargs: dict[str, Any], n: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("virtual-token methods need a 2-D attention_mask (batch, tokens)")
        kwargs["attention_mask"] = prepend(mask, n, 1)


def hf_prompt_learning_config(model: nn.Module, peft_type: str, num_virtual_tokens: int, token_dim: int,
                              num_attention_heads: int) -> dict[str, Any]:
    """The fields every HF PEFT prompt-learning config has (PromptLearningConfig)."""
    return {
        "peft_type": peft_type,
        "task_type": hf_task_type(model),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": model.config.num_hidden_layers,
        "modules_to_save": list(model.peftfleet_modules_to_save) or None,
        "inference_mode": True,
    }


def to_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k if k == PROMPT_KEY else HEAD_PREFIX + k: v for k, v in state.items()}


def from_hf_keys(method_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    strange = [k for k in tensors if k != PROMPT_KEY and not k.startswith(HEAD_PREFIX)]
    if strange or PROMPT_KEY not in tensors:
        raise ValueError(
            f"{method_name}: expected {PROMPT_KEY!r} and {HEAD_PREFIX}* tensors, found {sorted(tensors)[:4]}"
        )
    return {k if k == PROMPT_KEY else k[len(HEAD_PREFIX):]: v for k, v in tensors.items()}


def load_prompt_state(method: Any, model: nn.Module, state: dict[str, torch.Tensor],
                      special: dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], None]]]) -> None:
    """Check ``state`` against what ``method`` saves for ``model``, then load it: each key of ``special``
    (e.g. the prompt) through its setter after a shape check, every other tensor into the parameter of
    that name (the task heads)."""
    check_state_keys(method.name, set(method.adapter_state_dict(model)), state)
    params = dict(model.named_parameters())
    shapes = {k: params[k].shape for k in state if k not in special} | {
        k: torch.Size(s) for k, (s, _) in special.items()
    }
    for k, t in state.items():  # check everything before changing anything
        if t.shape != shapes[k]:
            raise ValueError(f"{method.name}: {k} has shape {tuple(t.shape)}, model expects {tuple(shapes[k])}")
    for k, (_, setter) in special.items():
        setter(state[k])
    with torch.no_grad():
        for k, t in state.items():
            if k not in special:
                params[k].copy_(t)
