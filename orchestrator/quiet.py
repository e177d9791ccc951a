"""Quiet by default: a command shows peftfleet's own progress bars and tables; the log lines of Ray, Ray
Serve, DeepSpeed, transformers and the other libraries go to a file, ``$PEFTFLEET_HOME/logs/<time>-<pid>.log``,
named once on stderr when its first line lands there. ``--verbose`` (the CLI's and the demo's) shows them all
as before.

Inside :func:`output` (the CLI and the demo run their command in it):

* Ray is started or joined with ``log_to_driver=False`` (:func:`ray_init_options`, which the client passes
  when it connects): what workers and actors print (training jobs, Serve replicas) stays in Ray's logs and in
  each job's (``peftfleet logs JOB``) instead of streaming into the terminal;
* every library logger that writes to the terminal writes to the log file instead (:func:`sweep`), and so
  does everything that reaches the root logger. Libraries add their handlers when first imported, so the
  client sweeps again after connecting to Ray and after starting Serve;
* the loading and download progress bars of transformers, huggingface_hub and datasets are off.

peftfleet's own ``peftfleet.*`` loggers keep writing their warnings to stderr. Everything is put back when
the block ends, so a process that runs several commands (a test) keeps its own logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.home import peftfleet_home

OWN_LOGGERS = ("peftfleet",)  # ours: their warnings stay on the terminal
# read by huggingface_hub (and so transformers) and datasets when they are imported; later imports see these
PROGRESS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# For packages imported already: (package, module, query, whether the query's True means "on", off, on).
PROGRESS_SWITCHES = (
    ("transformers", "transformers.utils.logging", "is_progress_bar_enabled", True, "disable_progress_bar",
     "enable_progress_bar"),
    ("huggingface_hub", "huggingface_hub.utils", "are_progress_bars_disabled", False, "disable_progress_bars",
     "enable_progress_bars"),
    ("datasets", "datasets.utils.logging", "is_progress_bar_enabled", True, "disable_progress_bar",
     "enable_progress_bar"),
)


class LogFile(logging.FileHandler):
    """The log file, created on the first line written, which names the file on stderr then (once)."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.announced = False

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        """Kept as set: ``ray.init`` re-formats every handler of the ``ray`` logger (dropping the name)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.announced:
            self.announced = True
            print(f"peftfleet: library logs go to {self.baseFilename} (--verbose shows them here)",
                  file=sys.stderr, flush=True)
        super().emit(record)


@dataclass
class _Quiet:
    handler: LogFile
    saved: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)  # logger → (handlers, propagate)
    env: dict[str, str | None] = field(default_factory=dict)
    bars: list[Any] = field(default_factory=list)  # functions turning back on the progress bars turned off


_active: _Quiet | None = None


def log_file_path(home: str | os.PathLike | None = None) -> Path:
    """A new log file's path under ``$PEFTFLEET_HOME/logs`` (its folder made)."""
    folder = peftfleet_home(home) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def output(verbose: bool = False, *, home: str | os.PathLike | None = None) -> Iterator[Path | None]:
    """Run a command quietly (unless ``verbose``); yields the log file's path (None when verbose). A block
    inside another one changes nothing: the outer one rules."""
    global _active
    if verbose or _active is not None:
        yield None if _active is None else Path(_active.handler.baseFilename)
        return
    _active = _Quiet(LogFile(log_file_path(home)))
    try:
        for name, value in PROGRESS_ENV.items():
            _active.env[name] = os.environ.get(name)
            os.environ[name] = value
        _progress_bars_off(_active)
        sweep()
        yield Path(_active.handler.baseFilename)
    finally:
        _restore(_active)
        _active = None


def ray_init_options() -> dict[str, Any]:
    """What ``ray.init`` gets besides its usual arguments: inside a quiet block, ``log_to_driver=False``."""
    return {"log_to_driver": False} if _active is not None else {}


def sweep() -> None:
    """Inside a quiet block, send every library logger that writes to the terminal to the log file instead
    (and the root logger there too); call again after importing a library that adds its own handler. Outside
    a block it does nothing."""
    state = _active
    if state is None:
        return
    root = logging.getLogger()
    if state.handler not in root.handlers:
        _save(state, "", root)
        root.addHandler(state.handler)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] in OWN_LOGGERS:
            continue
        terminal = [h for h in logger.handlers if _writes_to_terminal(h)]
        if terminal:
            _save(state, name, logger)
            for h in terminal:
                logger.removeHandler(h)
            if state.handler not in logger.handlers:
                logger.addHandler(state.handler)
            logger.propagate = False
    for name in OWN_LOGGERS:  # the root's file handler would otherwise swallow our warnings (no lastResort)
        own = logging.getLogger(name)
        if not own.handlers:
            _save(state, name, own)
            terminal = logging.StreamHandler(sys.stderr)
            terminal.setFormatter(logging.Formatter("%(message)s"))
            own.addHandler(terminal)
            own.propagate = False


def _writes_to_terminal(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _save(state: _Quiet, name: str, logger: logging.Logger) -> None:
    state.saved.setdefault(name, (list(logger.handlers), logger.propagate))


def _progress_bars_off(state: _Quiet) -> None:
    import importlib

    for package, module, query, means_on, off, on in PROGRESS_SWITCHES:
        if package not in sys.modules:
            continue  # it reads PROGRESS_ENV when imported
        lib = importlib.import_module(module)
        if getattr(lib, query)() == means_on:
            getattr(lib, off)()
            state.bars.append(getattr(lib, on))


def _restore(state: _Quiet) -> None:
    for name, (handlers, propagate) in state.saved.items():
        logger = logging.getLogger(name) if name else logging.getLogger()
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = propagate
    for name, value in state.env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for turn_on in state.bars:
        turn_on()
    state.handler.close()
