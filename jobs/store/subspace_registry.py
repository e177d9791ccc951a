"""The subspace registry: fitted IPT subspaces, each tied to its base model and source adapters.

A subspace (see :mod:`peft_methods.ipt`) is a folder — decoder tensors plus ``subspace.json`` —
published to artifact storage like an adapter and recorded with the prompt-tuning adapters it was
fitted on, so an IPT adapter's lineage runs: IPT job -> subspace -> source adapters -> their jobs.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from jobs.spec import validate_name
from jobs.store.artifacts import ArtifactStorage
from jobs.store.base_model_registry import BaseModelRegistry
from jobs.store.db import Database
from jobs.store.records import NotFound
from jobs.store.schema import SubspaceRow
from peft_methods.adapter_files import AdapterIntegrityError, BaseModelMismatch, read_hashed_files, sha256_file
from peft_methods.ipt import SUBSPACE_FORMAT, SUBSPACE_JSON, SUBSPACE_TENSORS, read_subspace_info

_FORMAT = {"manifest": SUBSPACE_JSON, "verify": read_subspace_info}  # how artifact storage checks a subspace folder


class SubspaceNotFound(NotFound):
    pass


class SubspaceExists(ValueError):
    pass


@dataclass(frozen=True)
class SubspaceRecord:
    id: str
    name: str
    job_id: str | None
    base_fingerprint: str
    uri: str
    sha256: str
    intrinsic_dim: int
    num_virtual_tokens: int
    sources: tuple[dict[str, Any], ...]
    metrics: dict[str, float]
    created_at: float


class SubspaceRegistry:
    def __init__(self, db: Database, artifacts: ArtifactStorage, base_models: BaseModelRegistry):
        self.db, self.artifacts, self.base_models = db, artifacts, base_models

    def register(
        self, folder: str | os.PathLike, *, name: str, base_fingerprint: str, sources: list[dict[str, Any]],
        job_id: str | None = None, metrics: dict[str, float] | None = None,
    ) -> SubspaceRecord:
        """Verify ``folder``, publish it, then record it; ``sources`` describe the adapters it came from."""
        validate_name(name, "subspace name")
        info, blobs = read_hashed_files(folder, SUBSPACE_JSON, "IPT subspace", SUBSPACE_FORMAT, (SUBSPACE_TENSORS,))
        info_sha256 = hashlib.sha256(blobs[SUBSPACE_JSON]).hexdigest()
        del blobs
        if info.get("metadata", {}).get("base_fingerprint") != base_fingerprint:
            raise BaseModelMismatch(f"subspace folder {folder} was not fitted for base {base_fingerprint}")
        self.base_models.get(base_fingerprint)
        with self.db.read() as s:
            if s.scalar(select(SubspaceRow.id).where(SubspaceRow.name == name)) is not None:
                raise SubspaceExists(f"a subspace named {name!r} already exists")
        subspace_id = uuid.uuid4().hex
        # the copy published is checked to carry this very subspace.json, so the record describes what landed
        uri = self.artifacts.publish(folder, f"subspaces/{subspace_id}", **_FORMAT, manifest_sha256=info_sha256)
        row = SubspaceRow(
            id=subspace_id, name=name, job_id=job_id, base_fingerprint=base_fingerprint, uri=uri,
            sha256=info_sha256, intrinsic_dim=info["intrinsic_dim"],
            num_virtual_tokens=info["num_virtual_tokens"], sources=list(sources), metrics=dict(metrics or {}),
            created_at=time.time(),
        )
        try:
            with self.db.write() as s:
                s.add(row)
        except BaseException as e:
            self.artifacts.delete(uri)
            if isinstance(e, IntegrityError):
                raise SubspaceExists(f"a subspace named {name!r} already exists") from None
            raise
        return self.get(subspace_id)

    def get(self, name_or_id: str) -> SubspaceRecord:
        with self.db.read() as s:
            row = s.scalar(select(SubspaceRow).where(SubspaceRow.name == name_or_id)) or s.get(SubspaceRow, name_or_id)
            if row is None:
                raise SubspaceNotFound(f"no subspace named {name_or_id!r}")
            return _record(row)

    def list(self, *, base: str | None = None) -> list[SubspaceRecord]:
        """Subspaces, newest first; ``base`` is a fingerprint or a registered base's name."""
        query = select(SubspaceRow).order_by(SubspaceRow.created_at.desc(), SubspaceRow.id)
        if base is not None:
            query = query.where(SubspaceRow.base_fingerprint == self.base_models.get(base).fingerprint)
        with self.db.read() as s:
            return [_record(r) for r in s.scalars(query)]

    def delete(self, name: str) -> None:
        """Remove the record, then the files. IPT adapters trained in it keep working: they hold their prompt."""
        record = self.get(name)
        with self.db.write() as s:
            s.execute(delete(SubspaceRow).where(SubspaceRow.id == record.id))
        self.artifacts.delete(record.uri)

    def local_folder(self, name: str) -> Path:
        """A verified local copy of the subspace's folder."""
        record = self.get(name)
        folder = self.artifacts.local_path(record.uri, **_FORMAT)
        if sha256_file(folder / SUBSPACE_JSON) != record.sha256:
            raise AdapterIntegrityError(f"subspace {name!r}: {SUBSPACE_JSON} at {record.uri} is not the one registered")
        return folder


def _record(r: SubspaceRow) -> SubspaceRecord:
    return SubspaceRecord(
        r.id, r.name, r.job_id, r.base_fingerprint, r.uri, r.sha256, r.intrinsic_dim, r.num_virtual_tokens,
        tuple(r.sources), dict(r.metrics), r.created_at,
    )
