"""Where peftfleet keeps its files on this machine: ``$PEFTFLEET_HOME``, else ``~/.peftfleet``."""

from __future__ import annotations

import os
from pathlib import Path


def peftfleet_home(override: str | os.PathLike | None = None) -> Path:
    path = Path(override or os.environ.get("PEFTFLEET_HOME") or Path.home() / ".peftfleet").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
