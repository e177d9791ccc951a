"""Reading a job-spec or sweep file into plain data, with limits: nothing a file holds can make reading it
expensive or crash it.

A file is at most :data:`MAX_BYTES`, nests mappings and lists at most :data:`MAX_DEPTH` deep, and holds only
JSON's kinds of value (mappings, lists, strings, numbers, booleans, null). YAML anchors and aliases
(``&name`` / ``*name``, also ``<<: *name``) are refused outright: an alias repeats a whole subtree, so a few
lines of them expand to billions of values ("billion laughs"). Every refusal is a :class:`DocumentError`,
one line naming the field (or the line of the file) at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
_PLAIN = (str, int, float, bool, type(None))


class DocumentError(ValueError):
    """A spec file that cannot be read; ``field`` is where in the document ("" for the whole of it)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases, refusing deep nesting before it composes it (the
    composer recurses once per level, so the check stops it long before Python's recursion limit)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise DocumentError("", f"{line}: YAML anchors and aliases (&name, *name) are not allowed in a spec")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if self.depth >= MAX_DEPTH:
                raise DocumentError("", f"{line}: nested more than {MAX_DEPTH} levels deep")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        return super().compose_node(parent, index)


def load_document(path: str | os.PathLike) -> Any:
    """The data of a .yaml/.yml or .json file, within the limits above; raises :class:`DocumentError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except (OSError, ValueError) as e:
        raise DocumentError("", f"cannot read {shown(str(path))}: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) > MAX_BYTES:
        raise DocumentError("", f"{shown(str(path))} is larger than {MAX_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError("", f"{shown(str(path))} is not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DocumentError("", f"{shown(str(path))} is not valid JSON: {e.msg} (line {e.lineno})") from None
        except RecursionError:
            raise DocumentError("", f"{shown(str(path))} is nested more than {MAX_DEPTH} levels deep") from None
        except ValueError:  # e.g. an integer of more digits than Python converts
            raise DocumentError("", f"{shown(str(path))} is not valid JSON: a number it cannot convert") from None
    else:
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise DocumentError("", f"{shown(str(path))} is not valid YAML: {problem}{where}") from None
        except DocumentError:
            raise
        except ValueError:  # a scalar its tag cannot convert: an integer of too many digits, a date out of range
            raise DocumentError("", f"{shown(str(path))} is not valid YAML: a value it cannot convert") from None
        finally:
            loader.dispose()
    check_tree(data, plain=True)
    return data


def check_tree(data: Any, *, plain: bool = False) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` (walked without recursion) and, with ``plain``, values
    that are not JSON's (a YAML date, set or binary)."""
    stack = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise DocumentError(where, f"nested more than {MAX_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{where}.{key(k)}" if where else key(k), depth + 1) for k, v in items)
        elif plain and not isinstance(value, _PLAIN):
            raise DocumentError(
                where, f"a {type(value).__name__} is not allowed: only mappings, lists, strings, numbers, "
                "booleans and null"
            )


def key(part: Any) -> str:
    """A mapping key or list index as a part of a field path: an empty key shows as ``''``."""
    return str(part) or "''"


def shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message: escaped, and cut to ``limit`` characters."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")
