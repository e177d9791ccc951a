"""The adapter registry: which adapters exist, what base and job they came from, which is promoted.

An adapter is registered after its folder has been published to artifact storage, in one
transaction with its tags, so no record ever points at a half-written artifact. One adapter per
(base model, task name) can be *promoted*: the one serving picks when asked for the task.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from torch import nn

import peft_methods
from jobs.spec import validate_name
from jobs.store.artifacts import ArtifactStorage
from jobs.store.base_model_registry import BaseModelRegistry
from jobs.store.db import Database
from jobs.store.fingerprint import base_fingerprint
from jobs.store.records import NotFound
from jobs.store.schema import AdapterRow, AdapterTagRow, PromotionRow
from peft_methods.adapter_files import (
    ADAPTER_FILES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    AdapterIntegrityError,
    BaseModelMismatch,
    read_hashed_files,
    sha256_file,
)


class AdapterNotFound(NotFound):
    pass


class AdapterExists(ValueError):
    pass


class AdapterPromoted(RuntimeError):
    """Deleting a promoted adapter needs ``force=True``."""


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    name: str
    job_id: str | None
    base_fingerprint: str
    method: str
    task: str
    task_name: str
    uri: str
    sha256: str
    files: dict[str, str]
    size_bytes: int
    num_parameters: int
    metrics: dict[str, float]
    tags: tuple[str, ...]
    created_at: float
    promoted: bool


class AdapterRegistry:
    def __init__(self, db: Database, artifacts: ArtifactStorage, base_models: BaseModelRegistry):
        self.db, self.artifacts, self.base_models = db, artifacts, base_models

    def register(
        self, folder: str | os.PathLike, *, name: str, base_fingerprint: str, task: str, task_name: str,
        job_id: str | None = None, metrics: dict[str, float] | None = None, tags: tuple[str, ...] | list[str] = (),
        in_transaction: Callable[[Session], None] | None = None,
    ) -> AdapterRecord:
        """Verify ``folder``, publish it to artifact storage, then record it.

        ``in_transaction(session)`` runs in the transaction that records the adapter, after its row
        and tags (e.g. to move its job to SUCCEEDED with it); if it raises, nothing is recorded, the
        published files are removed and its exception propagates unchanged."""
        validate_name(name, "adapter name")
        validate_name(task_name, "task name")
        for tag in tags:
            validate_name(tag, "tag")
        manifest, blobs = read_hashed_files(folder, MANIFEST_FILE, "adapter", FORMAT_VERSION, ADAPTER_FILES)
        manifest_sha256 = hashlib.sha256(blobs[MANIFEST_FILE]).hexdigest()
        del blobs
        trained_on = manifest.get("metadata", {}).get("base_fingerprint")
        if trained_on != base_fingerprint:
            raise BaseModelMismatch(
                f"adapter folder {folder} records base {trained_on or '(none)'}, not {base_fingerprint}"
            )
        self.base_models.get(base_fingerprint)  # must be registered first
        with self.db.read() as s:
            if s.scalar(select(AdapterRow.id).where(AdapterRow.name == name)) is not None:
                raise AdapterExists(f"an adapter named {name!r} already exists")
        adapter_id = uuid.uuid4().hex
        # the copy published is checked to carry this very manifest, so the record describes what landed
        uri = self.artifacts.publish(folder, f"adapters/{adapter_id}", manifest_sha256=manifest_sha256)
        row = AdapterRow(
            id=adapter_id, name=name, job_id=job_id, base_fingerprint=base_fingerprint, method=manifest["method"],
            task=task, task_name=task_name, uri=uri, sha256=manifest_sha256,
            files=manifest["files"], size_bytes=self.artifacts.size_bytes(uri),
            num_parameters=manifest["num_parameters"], metrics=dict(metrics or {}), created_at=time.time(),
        )
        ours = True  # an IntegrityError from our own rows means the name was taken meanwhile
        try:
            with self.db.write() as s:
                s.add(row)
                s.flush()
                s.add_all(AdapterTagRow(adapter_id=adapter_id, tag=t) for t in sorted(set(tags)))
                s.flush()
                if in_transaction is not None:
                    ours = False
                    in_transaction(s)
        except BaseException as e:
            self.artifacts.delete(uri)  # the record never existed; neither should the files
            if ours and isinstance(e, IntegrityError):
                raise AdapterExists(f"an adapter named {name!r} already exists") from None
            raise
        return self.get(adapter_id)

    def get(self, name_or_id: str) -> AdapterRecord:
        with self.db.read() as s:
            row = s.scalar(select(AdapterRow).where(AdapterRow.name == name_or_id)) or s.get(AdapterRow, name_or_id)
            if row is None:
                raise AdapterNotFound(f"no adapter named {name_or_id!r}")
            return _records(s, [row])[0]

    def list(
        self, *, base: str | None = None, task_name: str | None = None, task: str | None = None,
        method: str | None = None, tag: str | None = None, job_id: str | None = None, promoted: bool | None = None,
    ) -> list[AdapterRecord]:
        """Adapters, newest first. ``base`` is a fingerprint or the name a base was registered under."""
        query = select(AdapterRow).order_by(AdapterRow.created_at.desc(), AdapterRow.id)
        if base is not None:
            query = query.where(AdapterRow.base_fingerprint == self.base_models.get(base).fingerprint)
        for column, value in (
            (AdapterRow.task_name, task_name),
            (AdapterRow.task, task),
            (AdapterRow.method, method),
            (AdapterRow.job_id, job_id),
        ):
            if value is not None:
                query = query.where(column == value)
        if tag is not None:
            query = query.where(AdapterRow.id.in_(select(AdapterTagRow.adapter_id).where(AdapterTagRow.tag == tag)))
        if promoted is not None:
            ids = select(PromotionRow.adapter_id)
            query = query.where(AdapterRow.id.in_(ids) if promoted else AdapterRow.id.notin_(ids))
        with self.db.read() as s:
            return _records(s, list(s.scalars(query)))

    def promote(self, name: str) -> AdapterRecord:
        """Make ``name`` the current adapter for its (base, task name), replacing any other."""
        record = self.get(name)
        with self.db.write() as s:
            s.execute(delete(PromotionRow).where(
                PromotionRow.base_fingerprint == record.base_fingerprint, PromotionRow.task_name == record.task_name
            ))
            s.add(
                PromotionRow(
                    base_fingerprint=record.base_fingerprint,
                    task_name=record.task_name,
                    adapter_id=record.id,
                    promoted_at=time.time(),
                )
            )
        return self.get(record.id)

    def demote(self, name: str) -> None:
        record = self.get(name)
        with self.db.write() as s:
            s.execute(delete(PromotionRow).where(PromotionRow.adapter_id == record.id))

    def promoted(self, base: str, task_name: str) -> AdapterRecord | None:
        fingerprint = self.base_models.get(base).fingerprint
        with self.db.read() as s:
            adapter_id = s.scalar(select(PromotionRow.adapter_id).where(
                PromotionRow.base_fingerprint == fingerprint, PromotionRow.task_name == task_name
            ))
        return None if adapter_id is None else self.get(adapter_id)

    def delete(self, name: str, *, force: bool = False) -> None:
        """Remove the record, then the files. A promoted adapter needs ``force=True``."""
        record = self.get(name)
        with self.db.write() as s:
            if s.scalar(select(PromotionRow.adapter_id).where(PromotionRow.adapter_id == record.id)) is not None:
                if not force:
                    raise AdapterPromoted(
                        f"adapter {name!r} is promoted for task {record.task_name!r}; demote it or pass force=True"
                    )
                s.execute(delete(PromotionRow).where(PromotionRow.adapter_id == record.id))
            s.execute(delete(AdapterTagRow).where(AdapterTagRow.adapter_id == record.id))
            s.execute(delete(AdapterRow).where(AdapterRow.id == record.id))
        self.artifacts.delete(record.uri)

    def local_folder(self, name: str) -> Path:
        """A verified local copy of the adapter's folder (the folder itself for local storage)."""
        record = self.get(name)
        folder = self.artifacts.local_path(record.uri)
        if sha256_file(folder / MANIFEST_FILE) != record.sha256:
            raise AdapterIntegrityError(f"adapter {name!r}: {MANIFEST_FILE} at {record.uri} is not the one registered")
        return folder

    def load(self, name: str, model: nn.Module, *, base_path: str | os.PathLike | None = None) -> nn.Module:
        """Apply a registered adapter to a fresh base ``model``, refusing a different base.

        ``base_path`` is the folder ``model`` was loaded from (default: ``model.config._name_or_path``).
        """
        record = self.get(name)
        path = base_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise ValueError("cannot tell which base this model is; pass base_path")
        actual = base_fingerprint(path, home=self.base_models.home)
        if actual != record.base_fingerprint:
            raise BaseModelMismatch(
                f"adapter {name!r} was trained on base {record.base_fingerprint}, "
                f"but the model is base {actual} (loaded from {path})"
            )
        return peft_methods.load_adapter(
            model, self.local_folder(name), base_fingerprint=actual, manifest_sha256=record.sha256
        )


def _records(s: Any, rows: list[AdapterRow]) -> list[AdapterRecord]:
    if not rows:
        return []
    ids = [r.id for r in rows]
    tags: dict[str, list[str]] = {}
    for adapter_id, tag in s.execute(
        select(AdapterTagRow.adapter_id, AdapterTagRow.tag).where(AdapterTagRow.adapter_id.in_(ids))
    ):
        tags.setdefault(adapter_id, []).append(tag)
    promoted = set(s.scalars(select(PromotionRow.adapter_id).where(PromotionRow.adapter_id.in_(ids))))
    return [
        AdapterRecord(
            r.id, r.name, r.job_id, r.base_fingerprint, r.method, r.task, r.task_name, r.uri, r.sha256,
            dict(r.files), r.size_bytes, r.num_parameters, dict(r.metrics), tuple(sorted(tags.get(r.id, ()))),
            r.created_at, r.id in promoted,
        )
        for r in rows
    ]
