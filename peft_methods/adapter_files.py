"""The adapter artifact: one folder that HF PEFT can read and peftfleet can verify.

    adapter_config.json          the method's config (HF PEFT's format for methods it knows)
    adapter_model.safetensors    exactly the adapter's tensors, keys `base_model.model.<param>`
    peftfleet.json               method, our config, sha256 of every file, caller metadata

The folder is written under a temporary name and renamed into place, so a reader never sees half
an adapter. Loading reads each file once, checks its hash on those bytes and parses the same
bytes (never re-reading a file after checking it); it only ever reads safetensors, refuses symbolic
links, and a manifest may list exactly the two files above, by plain name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from peft_methods.api import applied_config
from peft_methods.registry import get_method

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "peftfleet.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the manifest hashes, exactly


class AdapterIntegrityError(ValueError):
    """An adapter folder is incomplete, altered or corrupt."""


class BaseModelMismatch(ValueError):
    """An adapter met a base model other than the one it was trained on."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, *, metadata: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write the adapter applied to ``model`` into ``directory`` atomically; returns the path.

    ``metadata`` (JSON-serialisable: job id, metrics, base fingerprint...) goes into peftfleet.json.
    """
    config = applied_config(model)
    if config is None:
        raise ValueError("no PEFT method is applied to this model; nothing to save")
    method = get_method(config.method)
    dest = Path(directory)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in method.adapter_state_dict(model).items()}
        tensors = method.to_file_keys(state)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, method.adapter_config(model, config))
        manifest = {
            "format_version": FORMAT_VERSION,
            "method": config.method,
            "config": config.model_dump(mode="json"),
            "num_parameters": sum(t.numel() for t in tensors.values()),
            "files": {name: sha256_file(tmp / name) for name in (CONFIG_FILE, WEIGHTS_FILE)},
            "metadata": metadata or {},
        }
        write_json(tmp / MANIFEST_FILE, manifest)
        _fsync_dir(tmp)
        replace_folder(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """peftfleet.json of an adapter folder, after checking every listed file's sha256."""
    return read_hashed_json(directory, MANIFEST_FILE, "adapter", FORMAT_VERSION, ADAPTER_FILES)


def read_hashed_json(
    directory: str | os.PathLike, name: str, kind: str, version: int, expected: tuple[str, ...]
) -> dict[str, Any]:
    """A folder's JSON description (``name``) after checking its format version and that the files
    it lists under ``files`` are exactly ``expected``, each a regular file with the recorded sha256."""
    return _read_hashed(Path(directory), name, kind, version, expected, keep=False)[0]


def read_hashed_files(
    directory: str | os.PathLike, name: str, kind: str, version: int, expected: tuple[str, ...],
    *, manifest_sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Like :func:`read_hashed_json`, but also the bytes of every file (``name`` included), each read
    once: parse these, never the files again, and what was verified is what is loaded. With
    ``manifest_sha256`` the JSON description itself must have that hash (the one a registry recorded)."""
    return _read_hashed(Path(directory), name, kind, version, expected, keep=True, manifest_sha256=manifest_sha256)


def check_file_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no folder, not ``.``/``..``, no NUL, at most 255 bytes)."""
    if (
        not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise AdapterIntegrityError(f"{where}: {name!r} is not a plain file name")
    return name


def open_regular_file(folder: Path, name: str, *, missing: str | None = None) -> BinaryIO:
    """``folder/name`` open for reading, refusing a symbolic link (never followed) or anything but a
    regular file; ``missing`` is the error message when there is no such file."""
    check_file_name(name, str(folder))
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise AdapterIntegrityError(missing or f"{folder}: {name} is missing") from None
    except OSError as e:
        if (folder / name).is_symlink():
            raise AdapterIntegrityError(f"{folder}: {name} is a symbolic link, not a regular file") from None
        raise AdapterIntegrityError(f"{folder}: cannot read {name}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterIntegrityError(f"{folder}: {name} is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular_file(folder: Path, name: str, *, missing: str | None = None) -> bytes:
    """The bytes of ``folder/name``, opened as :func:`open_regular_file` does."""
    with open_regular_file(folder, name, missing=missing) as f:
        return f.read()


def _read_hashed(
    folder: Path, name: str, kind: str, version: int, expected: tuple[str, ...], *, keep: bool,
    manifest_sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    raw = read_regular_file(folder, name, missing=f"{folder} is not a peftfleet {kind}: no {name}")
    if manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise AdapterIntegrityError(f"{folder}: {name} is not the one registered (sha256 differs)")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterIntegrityError(f"{folder / name} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise AdapterIntegrityError(f"{folder / name} is not a JSON object")
    if manifest.get("format_version") != version:
        raise AdapterIntegrityError(
            f"{folder}: {kind} format {manifest.get('format_version')!r}, this peftfleet reads {version}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise AdapterIntegrityError(f"{folder}: {name} has no files table")
    for file, digest in files.items():
        check_file_name(file, f"{folder}: {name} lists")
        if not isinstance(digest, str):
            raise AdapterIntegrityError(f"{folder}: {name} lists no sha256 for {file}")
    for needed in expected:
        if needed not in files:
            raise AdapterIntegrityError(f"{folder}: {name} lists no hash for {needed}")
    if extra := sorted(set(files) - set(expected)):
        raise AdapterIntegrityError(f"{folder}: {name} lists files a {kind} does not hold: {', '.join(extra)}")
    blobs = {name: raw} if keep else {}
    for file, recorded in files.items():
        data = read_regular_file(folder, file)
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded:
            raise AdapterIntegrityError(
                f"{folder}: {file} sha256 {actual[:12]}… does not match the manifest's {recorded[:12]}…"
            )
        if keep:
            blobs[file] = data
    return manifest, blobs


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, *, base_fingerprint: str | None = None,
    manifest_sha256: str | None = None,
) -> nn.Module:
    """Apply the adapter saved in ``directory`` to a fresh base ``model`` (in place) and return it.

    With ``base_fingerprint`` (the fingerprint of the folder ``model`` was loaded from), an adapter
    recorded as trained on another base is refused with :class:`BaseModelMismatch`; with
    ``manifest_sha256``, a peftfleet.json other than that one is refused.
    """
    config, state, manifest = read_adapter(directory, manifest_sha256=manifest_sha256)
    trained_on = manifest.get("metadata", {}).get("base_fingerprint")
    if base_fingerprint is not None and trained_on != base_fingerprint:
        raise BaseModelMismatch(
            f"adapter {directory} was trained on base {trained_on or '(unrecorded)'}, "
            f"but the model it is being loaded into is base {base_fingerprint}"
        )
    method = get_method(config.method)
    method.apply(model, config)
    method.load_adapter_state_dict(model, state)
    return model


def read_adapter(
    directory: str | os.PathLike, *, manifest_sha256: str | None = None
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """An adapter folder's (config in its load form, tensors by parameter name, manifest), every
    hash checked on the very bytes parsed; for code that applies adapters its own way (mixed-batch
    serving). ``manifest_sha256`` as in :func:`load_adapter`."""
    manifest, blobs = read_hashed_files(
        directory, MANIFEST_FILE, "adapter", FORMAT_VERSION, ADAPTER_FILES, manifest_sha256=manifest_sha256
    )
    method = get_method(manifest["method"])
    config = method.Config.model_validate(manifest["config"])
    try:
        state = method.from_file_keys(load_safetensors(blobs[WEIGHTS_FILE]))
    except (ValueError, SafetensorError) as e:
        raise AdapterIntegrityError(f"{directory}: {e}") from None
    return method.loading_config(config, state), state, manifest


def replace_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` into place at ``dest``; an existing ``dest`` goes only once the new
    one is whole (renamed aside first, removed after)."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON with a final newline (what every peftfleet JSON file looks like)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



