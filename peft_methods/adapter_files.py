"""The adapter artifact: one folder that HF PEFT can read and peftfleet can verify.

    adapter_config.json          the method's config (HF PEFT's format for methods it knows)
    adapter_model.safetensors    exactly the adapter's tensors, keys `base_model.model.<param>`
    peftfleet.json               method, our config, sha256 of every file, caller metadata

The folder is written under a temporary name and renamed into place, so a reader never sees half
an adapter. Loading checks every hash before reading a tensor and only ever reads safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from peft_methods.api import applied_config
from peft_methods.registry import get_method

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "peftfleet.json"


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
        _write_json(tmp / CONFIG_FILE, method.adapter_config(model, config))
        manifest = {
            "format_version": FORMAT_VERSION,
            "method": config.method,
            "config": config.model_dump(mode="json"),
            "num_parameters": sum(t.numel() for t in tensors.values()),
            "files": {name: sha256_file(tmp / name) for name in (CONFIG_FILE, WEIGHTS_FILE)},
            "metadata": metadata or {},
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
        _fsync_dir(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """peftfleet.json of an adapter folder, after checking every listed file's sha256."""
    return read_hashed_json(directory, MANIFEST_FILE, "adapter", FORMAT_VERSION, (CONFIG_FILE, WEIGHTS_FILE))


def read_hashed_json(
    directory: str | os.PathLike, name: str, kind: str, version: int, required: tuple[str, ...]
) -> dict[str, Any]:
    """A folder's JSON description (``name``) after checking its format version and that every file
    it lists under ``files`` (at least ``required``) exists with the recorded sha256."""
    folder = Path(directory)
    try:
        manifest = json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise AdapterIntegrityError(f"{folder} is not a peftfleet {kind}: no {name}") from None
    except json.JSONDecodeError as e:
        raise AdapterIntegrityError(f"{folder / name} is not valid JSON: {e}") from None
    if manifest.get("format_version") != version:
        raise AdapterIntegrityError(
            f"{folder}: {kind} format {manifest.get('format_version')!r}, this peftfleet reads {version}"
        )
    files = manifest.get("files") or {}
    for needed in required:
        if needed not in files:
            raise AdapterIntegrityError(f"{folder}: {name} lists no hash for {needed}")
    for file, expected in files.items():
        path = folder / file
        if not path.is_file():
            raise AdapterIntegrityError(f"{folder}: {file} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise AdapterIntegrityError(
                f"{folder}: {file} sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…"
            )
    return manifest


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, base_fingerprint: str | None = None) -> nn.Module:
    """Apply the adapter saved in ``directory`` to a fresh base ``model`` (in place) and return it.

    With ``base_fingerprint`` (the fingerprint of the folder ``model`` was loaded from), an adapter
    recorded as trained on another base is refused with :class:`BaseModelMismatch`.
    """
    manifest = read_manifest(directory)
    trained_on = manifest.get("metadata", {}).get("base_fingerprint")
    if base_fingerprint is not None and trained_on != base_fingerprint:
        raise BaseModelMismatch(
            f"adapter {directory} was trained on base {trained_on or '(unrecorded)'}, "
            f"but the model it is being loaded into is base {base_fingerprint}"
        )
    config, state = _read_verified(directory, manifest)
    method = get_method(config.method)
    method.apply(model, config)
    method.load_adapter_state_dict(model, state)
    return model


def read_adapter(directory: str | os.PathLike) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """An adapter folder's (config in its load form, tensors by parameter name, manifest), every
    hash checked; for code that applies adapters its own way (mixed-batch serving)."""
    manifest = read_manifest(directory)
    return (*_read_verified(directory, manifest), manifest)


def _read_verified(directory: str | os.PathLike, manifest: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    method = get_method(manifest["method"])
    config = method.Config.model_validate(manifest["config"])
    try:
        state = method.from_file_keys(load_file(Path(directory) / WEIGHTS_FILE))
    except ValueError as e:
        raise AdapterIntegrityError(f"{directory}: {e}") from None
    return method.loading_config(config, state), state


def _write_json(path: Path, obj: Any) -> None:
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



