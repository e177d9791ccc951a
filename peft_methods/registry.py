"""Discovering methods: every method, ours included, is an entry point in ``peftfleet.peft_methods``.

A third-party package registers a method without touching peftfleet::

    [project.entry-points."peftfleet.peft_methods"]
    ia3 = "my_package.ia3:IA3"        # a PeftMethod subclass

The entry-point name must equal the method's ``name`` and its Config's ``method`` literal.
Broken, duplicate or malformed plugins raise :class:`PluginError` naming the entry point.
"""

from __future__ import annotations

import re
import typing
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from peft_methods.api import MethodConfig, PeftMethod

GROUP = "peftfleet.peft_methods"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class PluginError(RuntimeError):
    """A method plugin could not be registered; the message names its entry point."""


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    origin = f" (from distribution {dist.name} {dist.version})" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}' in group {GROUP!r}{origin}"


def _check(ep: EntryPoint, obj: object) -> PeftMethod:
    where = _describe(ep)
    if not (isinstance(obj, type) and issubclass(obj, PeftMethod)):
        raise PluginError(f"{where}: {obj!r} is not a subclass of peft_methods.PeftMethod")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"{where}: method name {name!r} must be lower-case [a-z][a-z0-9_]*, at most 32 chars")
    if name != ep.name:
        raise PluginError(f"{where}: entry-point name {ep.name!r} differs from the method's name {name!r}")
    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise PluginError(f"{where}: {obj.__name__}.Config must subclass peft_methods.MethodConfig")
    method_field = config.model_fields.get("method")
    if method_field is None or typing.get_args(method_field.annotation) != (name,):
        raise PluginError(f"{where}: {config.__name__}.method must be Literal[{name!r}]")
    if config.model_config.get("extra") != "forbid":
        raise PluginError(f"{where}: {config.__name__} must forbid extra fields")
    undocumented = [f for f, info in config.model_fields.items() if not info.description]
    if undocumented:
        raise PluginError(f"{where}: {config.__name__} fields {undocumented} have no description")
    try:
        config()
    except Exception as e:  # noqa: BLE001 - any failure here is the plugin's defect
        raise PluginError(f"{where}: {config.__name__}() must be valid with defaults alone: {e}") from e
    return obj()


def load_methods(eps: typing.Iterable[EntryPoint]) -> dict[str, PeftMethod]:
    """Load and validate methods from entry points (the registry's one code path, exposed for tests)."""
    methods: dict[str, PeftMethod] = {}
    origins: dict[str, EntryPoint] = {}
    for ep in eps:
        if ep.name in origins:
            if origins[ep.name].value == ep.value:
                continue  # the same distribution seen twice on sys.path
            raise PluginError(
                f"duplicate method name {ep.name!r}: {_describe(origins[ep.name])} and {_describe(ep)}"
            )
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - report any import failure with its origin
            raise PluginError(f"{_describe(ep)} failed to load: {type(e).__name__}: {e}") from e
        methods[ep.name] = _check(ep, obj)
        origins[ep.name] = ep
    return methods


@cache
def _registry() -> dict[str, PeftMethod]:
    return load_methods(entry_points(group=GROUP))


def refresh() -> None:
    """Forget discovered methods, e.g. after installing a plugin in a running process."""
    _registry.cache_clear()


def list_methods() -> list[str]:
    """Names of every installed method, sorted."""
    return sorted(_registry())


def get_method(name: str) -> PeftMethod:
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown PEFT method {name!r}; installed: {list_methods()}") from None
