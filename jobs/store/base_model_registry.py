"""Base models the store knows, by fingerprint: every adapter and subspace points at one.

Adapters match bases on the content fingerprint alone. Beside it each record keeps the base's lineage,
``source``: for a Hugging Face id the repo, the revision asked for and the commit it resolved to; for a
folder its path; for a packaged model its name, package and version; always each weight file's sha256.
The first registration's source is kept (one set of weights under two commits stays one base)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from jobs.base_models import base_model_origin
from jobs.store.db import Database
from jobs.store.fingerprint import base_fingerprint, weight_hashes
from jobs.store.records import NotFound
from jobs.store.schema import BaseModelRow


class BaseModelNotFound(NotFound):
    pass


@dataclass(frozen=True)
class BaseModelRecord:
    fingerprint: str
    name: str
    path: str
    model_type: str | None
    created_at: float
    source: dict[str, Any] | None = None  # lineage (see the module docstring); None if registered before it existed


class BaseModelRegistry:
    def __init__(self, db: Database, *, home: str | os.PathLike | None = None):
        self.db, self.home = db, home

    def register(self, ref: str) -> BaseModelRecord:
        """Register a base model once (by fingerprint); later calls return the same record (filling in the
        source of a base registered before sources were recorded)."""
        path, source = base_model_origin(ref, home=self.home)
        fingerprint = base_fingerprint(path, home=self.home)
        source = {**source, "files": weight_hashes(path, home=self.home)}
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        try:
            with self.db.write() as s:
                row = s.get(BaseModelRow, fingerprint)
                if row is None:
                    s.add(
                        BaseModelRow(
                            fingerprint=fingerprint,
                            name=ref,
                            path=str(path),
                            model_type=model_type,
                            created_at=time.time(),
                            source=source,
                        )
                    )
                else:
                    if row.source is None:
                        row.source = source
                    if not (Path(row.path) / "config.json").is_file():  # its folder is gone (an old venv, a
                        row.path = str(path)  # removed checkout): where these weights are now
        except IntegrityError:  # registered concurrently by another process
            pass
        return self.get(fingerprint)

    def get(self, fingerprint_or_name: str) -> BaseModelRecord:
        """A registered base by fingerprint, or by the name it was (most recently) registered under."""
        with self.db.read() as s:
            row = s.get(BaseModelRow, fingerprint_or_name) or s.scalar(
                select(BaseModelRow)
                .where(BaseModelRow.name == fingerprint_or_name)
                .order_by(BaseModelRow.created_at.desc())
                .limit(1)
            )
            if row is None:
                raise BaseModelNotFound(f"no base model {fingerprint_or_name!r} is registered")
            return _record(row)

    def list(self) -> list[BaseModelRecord]:
        with self.db.read() as s:
            return [_record(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at))]


def _record(r: BaseModelRow) -> BaseModelRecord:
    return BaseModelRecord(r.fingerprint, r.name, r.path, r.model_type, r.created_at, r.source)
