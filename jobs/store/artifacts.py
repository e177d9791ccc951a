"""Artifact storage: where adapter folders live, on a local disk or behind an fsspec URL.

``ArtifactStorage("/srv/peftfleet")`` (or ``file://...``, the default being
``$PEFTFLEET_HOME/artifacts``) copies a folder to a temporary name beside its destination and
renames it into place, so a reader never sees half an adapter. For other fsspec URLs (a shared
NFS mount given as a path, ``s3://bucket/prefix``, ``memory://`` in tests) files are uploaded
with ``peftfleet.json`` — the manifest that lists every file's sha256 — last: a folder without a
manifest, or whose files do not match it, is refused on read. Either way the store records an
adapter only after its upload has finished, so no record points at a missing artifact.

Only the files a manifest lists travel (never a symbolic link, never a file it does not name), and
the copy is verified before it is published. What a killed process leaves — ``.<name>.tmp-<hex>``
folders, artifacts no record points at — is found by ``clean_temp`` and ``abandoned``, for the
reconciler to remove once older than its grace period.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from jobs.home import peftfleet_home
from peft_methods.adapter_files import (
    MANIFEST_FILE,
    AdapterIntegrityError,
    check_file_name,
    open_regular_file,
    read_manifest,
    sha256_file,
)

Verify = Callable[[Path], dict[str, Any]]  # the manifest (its "files" table); raises when a folder does not match it


class ArtifactStorage:
    def __init__(self, url: str | os.PathLike | None = None, *, home: str | os.PathLike | None = None):
        raw = str(url) if url is not None else str(peftfleet_home(home) / "artifacts")
        parsed = urlparse(raw)
        self.home = home
        self.is_local = parsed.scheme in ("", "file")
        if self.is_local:
            self.root: str = str(Path(parsed.path if parsed.scheme else raw).expanduser().resolve())
            Path(self.root).mkdir(parents=True, exist_ok=True)
            self.fs = None
        else:
            self.fs, self.root = fsspec.core.url_to_fs(raw)
            self.root = self.root.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        self.url = raw

    def uri_for(self, key: str) -> str:
        if self.is_local:
            return str(Path(self.root) / key)
        return self.fs.unstrip_protocol(f"{self.root}/{key}")

    def publish(
        self, folder: str | os.PathLike, key: str, *, manifest: str = MANIFEST_FILE, verify: Verify = read_manifest,
        manifest_sha256: str | None = None,
    ) -> str:
        """Copy a verified folder to ``key`` (e.g. ``adapters/<id>``); returns its URI.

        ``manifest`` names the file that hashes the others (written last) and ``verify`` checks a
        folder against it: an adapter's by default, a subspace's for IPT subspaces. Only the files
        the manifest lists, and the manifest, are copied, each a regular file opened without
        following symbolic links; the copy is verified again before it is published, so what lands
        is what was checked (with ``manifest_sha256``: that exact manifest, the one a record keeps)."""
        folder = Path(folder)
        listed = sorted(verify(folder)["files"])  # never publish a folder that does not verify
        if self.is_local:
            dest = Path(self.root) / key
            if dest.exists():
                raise FileExistsError(f"artifact {dest} already exists")
            staging = dest.parent / _temp_name(dest.name)
        else:
            dest_key = f"{self.root}/{key}"
            if self.fs.exists(f"{dest_key}/{manifest}"):
                raise FileExistsError(f"artifact {self.uri_for(key)} already exists")
            staging = self._cache / _temp_name("publish-" + key.replace("/", "__"))
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        try:
            for name in [*listed, manifest]:
                with open_regular_file(folder, name) as src, open(staging / name, "xb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            if sorted(verify(staging)["files"]) != listed:
                raise AdapterIntegrityError(f"{folder}: {manifest} changed while it was being published")
            if manifest_sha256 is not None and sha256_file(staging / manifest) != manifest_sha256:
                raise AdapterIntegrityError(f"{folder}: {manifest} changed while it was being published")
            if self.is_local:
                staging.rename(dest)
                return str(dest)
            for name in [*listed, manifest]:  # the manifest goes last: until it lands the folder reads as incomplete
                self.fs.put_file(str(staging / name), f"{dest_key}/{name}")
            return self.uri_for(key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def local_path(self, uri: str, *, manifest: str = MANIFEST_FILE, verify: Verify = read_manifest) -> Path:
        """A verified local folder for ``uri``: the folder itself, or a verified download.

        A download fetches only the files the remote manifest lists and is verified once, before it
        is renamed into the cache; a cached folder is checked again on each call, but a caller must
        still verify the bytes it loads (``read_adapter``/``load_adapter`` do, against the record's
        manifest hash), since a local folder can change after this returns."""
        if self.is_local:
            path = Path(uri)
            verify(path)
            return path
        fs, path = fsspec.core.url_to_fs(uri)
        cache = self._cache / path.strip("/").replace("/", "__")
        if cache.exists():
            verify(cache)
            return cache
        try:
            raw = fs.cat_file(f"{path}/{manifest}")
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {uri} is missing or incomplete (no {manifest})") from None
        try:
            listed = list(json.loads(raw)["files"])
        except (ValueError, TypeError, KeyError):
            raise AdapterIntegrityError(f"artifact {uri}: {manifest} has no valid files table") from None
        names = [check_file_name(name, f"artifact {uri}: {manifest} lists") for name in listed]
        tmp = cache.parent / _temp_name(cache.name)
        tmp.mkdir(parents=True)
        try:
            for name in names:
                fs.get_file(f"{path}/{name}", str(tmp / name))
            (tmp / manifest).write_bytes(raw)
            verify(tmp)
            try:
                tmp.rename(cache)
            except OSError:  # another process fetched it first
                if not cache.exists():
                    raise
                verify(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cache

    def clean_temp(self, older_than_s: float) -> list[str]:
        """Remove the temporary folders (``.<name>.tmp-<hex>``) that a publish, a download or a
        save killed part-way left under the artifact root (one and two levels down: ``adapters/``,
        ``subspaces/``...) and in the download cache, if untouched for ``older_than_s`` seconds;
        returns the paths removed. A younger one may be a copy in progress and is left alone."""
        parents = [self._cache]
        if self.is_local:
            root = Path(self.root)
            parents += [root, *(p for p in _subfolders(root) if not p.name.startswith("."))]
        removed = []
        for parent in parents:
            for folder in _subfolders(parent):
                if _TEMP.fullmatch(folder.name) and _age_s(folder) > older_than_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(str(folder))
        return removed

    def abandoned(self, known_uris: set[str], older_than_s: float) -> list[str]:
        """URIs of artifact folders under ``adapters/`` and ``subspaces/`` that no URI in
        ``known_uris`` (the records') names and that are older than ``older_than_s`` seconds: left
        by a registration killed between publishing and recording (or an upload cut short).
        Remote folders whose age the filesystem cannot tell are never listed."""
        found = []
        for prefix in ARTIFACT_PREFIXES:
            if self.is_local:
                names = [p.name for p in _subfolders(Path(self.root) / prefix)]
            else:
                base = f"{self.root}/{prefix}"
                entries = self.fs.ls(base, detail=True) if self.fs.isdir(base) else []
                names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
            for name in sorted(names):
                uri = self.uri_for(f"{prefix}/{name}")
                if name.startswith(".") or uri in known_uris:
                    continue
                age = _age_s(Path(uri)) if self.is_local else self._remote_age_s(f"{self.root}/{prefix}/{name}")
                if age > older_than_s:
                    found.append(uri)
        return found

    @property
    def _cache(self) -> Path:
        """Where remote artifacts are downloaded (and staged for upload)."""
        return peftfleet_home(self.home) / "cache" / "artifacts"

    def _remote_age_s(self, path: str) -> float:
        newest = None
        for file in self.fs.find(path):
            try:
                stamp = self.fs.modified(file).timestamp()
            except (NotImplementedError, OSError, AttributeError):
                continue
            newest = stamp if newest is None else max(newest, stamp)
        return -1.0 if newest is None else time.time() - newest

    def delete(self, uri: str) -> None:
        if self.is_local:
            shutil.rmtree(uri, ignore_errors=True)
        else:
            fs, path = fsspec.core.url_to_fs(uri)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def size_bytes(self, uri: str) -> int:
        if self.is_local:
            return sum(p.lstat().st_size for p in Path(uri).iterdir() if p.is_file() and not p.is_symlink())
        fs, path = fsspec.core.url_to_fs(uri)
        return int(fs.du(path))


ARTIFACT_PREFIXES = ("adapters", "subspaces")  # the keys the registries publish under: <prefix>/<id>
_TEMP = re.compile(r"\..+\.tmp-[0-9a-f]{8}")


def _temp_name(name: str) -> str:
    return f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def _age_s(folder: Path) -> float:
    """Seconds since anything in ``folder`` (or the folder itself) last changed, symlinks not followed."""
    try:
        stamps = [folder.lstat().st_mtime]
        for dirpath, dirnames, filenames in os.walk(folder):
            stamps += [os.lstat(os.path.join(dirpath, n)).st_mtime for n in dirnames + filenames]
    except FileNotFoundError:
        return -1.0
    return time.time() - max(stamps)
