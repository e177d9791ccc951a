"""Base-model fingerprints: one hash of a model's config and weights, so an adapter trained on one
base is never silently applied to another.

The hash covers ``config.json`` (minus keys that change with the saving library, not the model)
and every ``*.safetensors`` file, in name order. Hashing 500 MB takes about a second, so results
are cached in ``$PEFTFLEET_HOME/fingerprints.json`` keyed by folder path and each file's size and
mtime: a changed file means a new hash, an unchanged folder is never read twice.

Each weight file's own sha256 (for the base's store record, :func:`weight_hashes`) is cached the same way
in ``weight_hashes.json``. Where the weights came from (a Hub commit, a folder) is recorded beside the
fingerprint, never inside it, so one set of weights reached two ways (a packaged copy and a Hub snapshot,
or two commits) stays one base.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from jobs.home import peftfleet_home
from peft_methods.adapter_files import (
    BaseModelMismatch,  # noqa: F401 - re-exported for callers
    sha256_file,
)

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
}
_CHUNK = 1 << 22


def _files(folder: Path) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights to fingerprint (only safetensors are loaded)")
    return [folder / "config.json", *weights]


def _stat_key(folder: Path) -> str:
    parts = [str(folder)]
    for f in _files(folder):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def compute_fingerprint(folder: str | os.PathLike) -> str:
    """Hash config + weights of the model in ``folder`` (uncached)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    canonical = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(canonical, sort_keys=True).encode())
    for f in _files(folder)[1:]:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def compute_weight_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """{weight file name: sha256 hex} of the ``*.safetensors`` files in ``folder`` (uncached)."""
    return {f.name: sha256_file(f) for f in _files(Path(folder))[1:]}


def base_fingerprint(folder: str | os.PathLike, *, home: str | os.PathLike | None = None) -> str:
    """The fingerprint of the model in ``folder``, from the cache when its files are unchanged."""
    return _cached("fingerprints.json", folder, home, compute_fingerprint)


def weight_hashes(folder: str | os.PathLike, *, home: str | os.PathLike | None = None) -> dict[str, str]:
    """Each weight file's sha256 in ``folder``, from the cache when its files are unchanged."""
    return _cached("weight_hashes.json", folder, home, compute_weight_hashes)


def _cached(name: str, folder: str | os.PathLike, home: str | os.PathLike | None, compute):
    folder = Path(folder).resolve()
    cache_file = peftfleet_home(home) / name
    key = _stat_key(folder)
    try:
        cache = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    value = compute(folder)
    cache = {k: v for k, v in cache.items() if not k.startswith(str(folder) + "|")}  # drop stale entries
    cache[key] = value
    tmp = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_file)  # last writer wins; every writer's content is correct
    return value
