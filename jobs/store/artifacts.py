"""Artifact storage: where adapter folders live, on a local disk or behind an fsspec URL.

``ArtifactStorage("/srv/peftfleet")`` (or ``file://...``, the default being
``$PEFTFLEET_HOME/artifacts``) copies a folder to a temporary name beside its destination and
renames it into place, so a reader never sees half an adapter. For other fsspec URLs (a shared
NFS mount given as a path, ``s3://bucket/prefix``, ``memory://`` in tests) files are uploaded
with ``peftfleet.json`` — the manifest that lists every file's sha256 — last: a folder without a
manifest, or whose files do not match it, is refused on read. Either way the store records an
adapter only after its upload has finished, so no record points at a missing artifact.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from jobs.home import peftfleet_home
from peft_methods.adapter_files import MANIFEST_FILE, read_manifest

Verify = Callable[[Path], Any]  # raises when a folder does not match its manifest


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
        self, folder: str | os.PathLike, key: str, *, manifest: str = MANIFEST_FILE, verify: Verify = read_manifest
    ) -> str:
        """Copy a verified folder to ``key`` (e.g. ``adapters/<id>``); returns its URI.

        ``manifest`` names the file that hashes the others (written last) and ``verify`` checks a
        folder against it: an adapter's by default, a subspace's for IPT subspaces."""
        folder = Path(folder)
        verify(folder)  # never publish a folder that does not verify
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != manifest) + [manifest]
        if self.is_local:
            dest = Path(self.root) / key
            if dest.exists():
                raise FileExistsError(f"artifact {dest} already exists")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                for name in files:
                    shutil.copyfile(folder / name, tmp / name)
                    with open(tmp / name, "rb") as f:
                        os.fsync(f.fileno())
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return str(dest)
        dest = f"{self.root}/{key}"
        if self.fs.exists(f"{dest}/{manifest}"):
            raise FileExistsError(f"artifact {self.uri_for(key)} already exists")
        for name in files:  # the manifest goes last: until it lands the folder reads as incomplete
            self.fs.put_file(str(folder / name), f"{dest}/{name}")
        return self.uri_for(key)

    def local_path(self, uri: str, *, manifest: str = MANIFEST_FILE, verify: Verify = read_manifest) -> Path:
        """A verified local folder for ``uri``: the folder itself, or a verified download."""
        if self.is_local:
            path = Path(uri)
            verify(path)
            return path
        fs, path = fsspec.core.url_to_fs(uri)
        cache = peftfleet_home(self.home) / "cache" / "artifacts" / path.strip("/").replace("/", "__")
        if cache.exists():
            verify(cache)
            return cache
        if not fs.exists(f"{path}/{manifest}"):
            raise FileNotFoundError(f"artifact {uri} is missing or incomplete (no {manifest})")
        tmp = cache.parent / f".{cache.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for remote in fs.ls(path, detail=False):
                fs.get_file(remote, str(tmp / remote.rsplit("/", 1)[-1]))
            verify(tmp)
            try:
                tmp.rename(cache)
            except OSError:  # another process fetched it first
                if not cache.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cache

    def delete(self, uri: str) -> None:
        if self.is_local:
            shutil.rmtree(uri, ignore_errors=True)
        else:
            fs, path = fsspec.core.url_to_fs(uri)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def size_bytes(self, uri: str) -> int:
        if self.is_local:
            return sum(p.stat().st_size for p in Path(uri).iterdir() if p.is_file())
        fs, path = fsspec.core.url_to_fs(uri)
        return int(fs.du(path))
