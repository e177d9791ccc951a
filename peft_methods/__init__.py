"""PEFT methods as plugins: apply one to a transformers model, save it, load it, merge it.

>>> import peft_methods
>>> peft_methods.list_methods()                              # doctest: +SKIP
['bitfit', 'lora']
>>> model = peft_methods.apply(model, {"method": "lora", "r": 8})   # doctest: +SKIP
>>> peft_methods.save_adapter(model, "out/my-adapter")       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any

from pydantic import Field, TypeAdapter
from torch import nn

from peft_methods.adapter_files import (
    AdapterIntegrityError,
    BaseModelMismatch,
    load_adapter,
    read_manifest,
    save_adapter,
)
from peft_methods.api import MethodConfig, PeftMethod, applied_config
from peft_methods.registry import PluginError, get_method, list_methods, refresh


def method_config_type() -> Any:
    """The discriminated union (on ``method``) of every installed method's Config."""
    configs = tuple(get_method(name).Config for name in list_methods())
    return Annotated[typing.Union[configs], Field(discriminator="method")]  # noqa: UP007


@functools.cache
def _config_adapter(methods: tuple[str, ...]) -> TypeAdapter:
    return TypeAdapter(method_config_type())


def parse_config(data: MethodConfig | dict[str, Any]) -> MethodConfig:
    """Validate a method config; errors name the field (``r: Input should be greater than 0``)."""
    if isinstance(data, MethodConfig):
        return data
    return _config_adapter(tuple(list_methods())).validate_python(data)


def apply(model: nn.Module, config: MethodConfig | dict[str, Any]) -> nn.Module:
    """Apply a method to ``model`` in place (only its parameters stay trainable) and return it."""
    config = parse_config(config)
    return get_method(config.method).apply(model, config)


def _method_of(model: nn.Module) -> PeftMethod:
    config = applied_config(model)
    if config is None:
        raise ValueError("no PEFT method is applied to this model")
    return get_method(config.method)


def adapter_state_dict(model: nn.Module) -> dict:
    """The tensors of the adapter applied to ``model``."""
    return _method_of(model).adapter_state_dict(model)


def merge(model: nn.Module) -> nn.Module:
    """Fold the applied adapter into the base weights (mergeable methods only)."""
    _method_of(model).merge(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    _method_of(model).unmerge(model)
    return model


__all__ = [
    "AdapterIntegrityError",
    "BaseModelMismatch",
    "MethodConfig",
    "PeftMethod",
    "PluginError",
    "adapter_state_dict",
    "applied_config",
    "apply",
    "get_method",
    "list_methods",
    "load_adapter",
    "merge",
    "method_config_type",
    "parse_config",
    "read_manifest",
    "refresh",
    "save_adapter",
    "unmerge",
]
