"""Verified checkpoints: what a checkpoint folder must hold before anything in it is read.

At write time the recipe takes a :func:`manifest` of the folder (the sha256 of every file) and its
reporter records it in the store with the job, its attempt and the step. At read time a restore
looks that record up and :func:`verify` s the folder against it — confined to the checkpoint root,
exactly the recorded files, each a regular file with its recorded hash — or raises
:class:`CheckpointRejected`, so whoever can write the checkpoint storage but not the store cannot
make a worker unpickle bytes of their choosing. DeepSpeed's files are then loaded with
``torch.load(weights_only=True)`` (:class:`WeightsOnlyCheckpointEngine`), allowing only the few plain
DeepSpeed types its ZeRO 0–3 checkpoints hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

STEP_FILE = "peftfleet_step.json"  # in every checkpoint folder: the job and step it holds, plain JSON
_STEP_FILE_LIMIT = 4096


class CheckpointRejected(Exception):
    """A checkpoint folder that does not match its record in the store (or has none): nothing was loaded."""


def manifest(folder: str | os.PathLike) -> dict[str, str]:
    """The sha256 of every regular file under ``folder``, by path relative to it ('/'-separated).
    Refuses symlinks and anything that is neither a regular file nor a folder."""
    root = Path(folder)
    files: dict[str, str] = {}
    for path, kind in _walk(root):
        if kind == "dir":
            continue
        if kind != "file":
            raise CheckpointRejected(f"checkpoint {root}: {path.relative_to(root).as_posix()} is {kind}, "
                                     "not a regular file")
        files[path.relative_to(root).as_posix()] = _sha256(path)
    return files


def verify(folder: str | os.PathLike, files: dict[str, str], root: str | os.PathLike | None = None) -> None:
    """Check ``folder`` before anything in it is read: under ``root`` (when given, both resolved),
    holding exactly ``files`` (relative path -> sha256), each a regular non-symlink file with its hash.
    Raises :class:`CheckpointRejected` naming the first difference."""
    where = Path(folder)
    for name, path in _listed(where, files, root).items():
        if _sha256(path) != files[name]:
            raise CheckpointRejected(f"checkpoint {where}: {name} does not match its recorded sha256")


@contextmanager
def verified_copy(folder: str | os.PathLike, files: dict[str, str],
                  root: str | os.PathLike | None = None) -> Iterator[str]:
    """:func:`verify` ``folder`` while copying it to a private temporary folder, which is yielded: what is
    loaded afterwards is the bytes that were hashed, whatever happens to ``folder`` meanwhile."""
    where = Path(folder)
    listed = _listed(where, files, root)
    with tempfile.TemporaryDirectory(prefix="peftfleet-verified-") as private:
        for name, path in sorted(listed.items()):
            target = Path(private, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if _sha256(path, copy_to=target) != files[name]:
                raise CheckpointRejected(f"checkpoint {where}: {name} does not match its recorded sha256")
        yield private


def _listed(where: Path, files: dict[str, str], root: str | os.PathLike | None) -> dict[str, Path]:
    """The files of ``where`` by relative name, once its place and listing match the record."""
    if where.is_symlink():
        raise CheckpointRejected(f"checkpoint {where} is a symlink")
    if not where.is_dir():
        raise CheckpointRejected(f"checkpoint {where} is not a folder")
    if root is not None and not where.resolve().is_relative_to(Path(root).resolve()):
        raise CheckpointRejected(f"checkpoint {where} lies outside the checkpoint root {root}")
    if not files:
        raise CheckpointRejected(f"checkpoint {where}: its record lists no files")
    found: dict[str, Path] = {}
    for path, kind in _walk(where):
        name = path.relative_to(where).as_posix()
        if kind == "dir":
            continue
        if kind != "file":
            raise CheckpointRejected(f"checkpoint {where}: {name} is {kind}, not a regular file")
        if name not in files:
            raise CheckpointRejected(f"checkpoint {where}: {name} is not in its record")
        found[name] = path
    missing = sorted(set(files) - set(found))
    if missing:
        raise CheckpointRejected(f"checkpoint {where}: {missing[0]} is missing ({len(missing)} recorded file(s))")
    return found


def read_step_file(folder: str | os.PathLike) -> dict[str, Any]:
    """The job id and step a checkpoint folder says it holds (plain JSON, a regular file, a few bytes).
    Only a hint for finding its record: never trusted alone."""
    path = Path(folder) / STEP_FILE
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointRejected(f"checkpoint {folder} has no {STEP_FILE}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _STEP_FILE_LIMIT:
        raise CheckpointRejected(f"checkpoint {folder}: {STEP_FILE} is not a small regular file")
    try:
        saved = json.loads(path.read_text())
        job_id, step = saved["job_id"], saved["step"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointRejected(f"checkpoint {folder}: {STEP_FILE} does not name a job and step") from None
    if not isinstance(job_id, str) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointRejected(f"checkpoint {folder}: {STEP_FILE} does not name a job and step")
    return {"job_id": job_id, "step": step}


def merge(manifests: list[dict[str, str]]) -> dict[str, str]:
    """One manifest of the folder every rank's files are persisted into (a file several ranks wrote
    must be the same on each)."""
    merged: dict[str, str] = {}
    for files in manifests:
        for name, digest in files.items():
            if merged.setdefault(name, digest) != digest:
                raise CheckpointRejected(f"ranks wrote different {name} into one checkpoint")
    return merged


def weights_only_engine():
    """A DeepSpeed checkpoint engine that reads with ``torch.load(weights_only=True)``, allowing only the
    plain types DeepSpeed's ZeRO 0–3 checkpoints hold besides tensors (a loss scaler's numbers, the ZeRO
    stage, a fragment's offsets)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def _walk(root: Path):
    """Every entry under ``root`` (not following symlinks): (path, 'dir' | 'file' | what else it is)."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        path = Path(entry.path)
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            yield path, "a symlink"
        elif stat.S_ISDIR(mode):
            yield path, "dir"
            yield from _walk(path)
        elif stat.S_ISREG(mode):
            yield path, "file"
        else:
            yield path, "not a regular file or folder"


def _sha256(path: Path, copy_to: Path | None = None) -> str:
    """The file's sha256 (opened without following a symlink), written to ``copy_to`` as it is read."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f, (open(copy_to, "xb") if copy_to else nullcontext()) as out:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CheckpointRejected(f"{path} is not a regular file")
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()
