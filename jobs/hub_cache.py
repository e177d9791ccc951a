"""The standard Hugging Face cache, located and written without the network.

huggingface_hub keeps what it downloads under ``HF_HUB_CACHE`` (default ``$HF_HOME/hub``) as
``models--org--name/`` (or ``datasets--org--name/``): ``blobs/`` holds file contents named by hash,
``refs/<revision>`` the commit a branch or tag points at, and ``snapshots/<commit>/`` the repository's
files as relative symlinks into ``blobs/``. :func:`seed_hub_cache` writes that layout from a local folder
(a packaged model, a folder of parquet/jsonl files), so an air-gapped cluster and our offline tests can
name Hub ids; huggingface_hub then reads the result exactly as it reads its own downloads.

The environment is read at call time (huggingface_hub reads it once, at import), so a process that sets
``HF_HUB_CACHE`` or ``HF_HUB_OFFLINE`` after importing still gets what it asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from peft_methods.adapter_files import sha256_file

REPO_TYPES = ("model", "dataset")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the cache only (huggingface_hub's truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_revision(revision: str) -> str:
    """A branch or tag name as git allows it (``main``, ``v1.0``, ``refs/pr/1``); ValueError otherwise."""
    if (
        not isinstance(revision, str)
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".", ".lock"))
    ):
        raise ValueError(
            f"revision {revision!r} is not a branch, tag or commit name (letters, digits, '.', '_', '-', '+', '/')"
        )
    return revision


def repo_cache_folder(repo_id: str, *, repo_type: str = "model", cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/models--org--name`` (or ``datasets--…``): where one repository's blobs, refs and snapshots live."""
    from huggingface_hub.file_download import repo_folder_name

    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type {repo_type!r} is not one of {REPO_TYPES}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    return cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def seed_hub_cache(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str = "main",
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Copy every file under ``folder`` (hidden ones aside) into the Hugging Face cache as ``repo_id`` at
    ``revision``; returns the snapshot's commit, a 40-hex hash of the files' paths and contents (so the
    same files seed the same commit on every machine, and seeding twice changes nothing).

    Blobs are named by their sha256; the snapshot is assembled beside its final place and renamed, and the
    ref is written last, so a reader never sees a ref pointing at half a snapshot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    source = Path(folder).expanduser()
    if not source.is_dir():
        raise NotADirectoryError(f"seed_hub_cache: {str(source)!r} is not a folder")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"seed_hub_cache: {str(e).splitlines()[0]}") from None
    check_revision(revision)
    if _COMMIT.fullmatch(revision):
        raise ValueError("seed_hub_cache: name a branch or tag as the revision; the commit is computed from the files")
    files = _files(source)
    if not files:
        raise FileNotFoundError(f"seed_hub_cache: {str(source)!r} holds no files")

    storage = repo_cache_folder(repo_id, repo_type=repo_type, cache_dir=cache_dir)
    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    hashes = {name: _store_blob(source / name, blobs) for name in files}
    commit = hashlib.sha1(
        "".join(f"{name}\0{digest}\n" for name, digest in sorted(hashes.items())).encode()
    ).hexdigest()

    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        tmp = storage / "snapshots" / f".{commit}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for name, digest in hashes.items():
                link = tmp / name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blobs / digest, link.parent))
            try:
                tmp.rename(snapshot)
            except OSError:  # seeded concurrently: the same commit means the same files
                if not snapshot.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _write_atomically(storage / "refs" / revision, commit.encode())
    return commit


def _files(source: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``source``, skipping hidden files and folders."""
    found = []
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                found.append(path.relative_to(source).as_posix())
    return found


def _store_blob(path: Path, blobs: Path) -> str:
    name = sha256_file(path)
    blob = blobs / name
    if not (blob.is_file() and blob.stat().st_size == path.stat().st_size):
        tmp = blobs / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)
    return name


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
