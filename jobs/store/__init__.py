"""Where records live: the job store and, on the same database and artifact storage, the registries
of base models, adapters, IPT subspaces and sweeps.

Floors, bottom up: ``schema`` (tables) → ``db`` (engine, sessions, schema check) and ``records``
→ ``artifacts`` and ``fingerprint`` → the registries → ``job_store`` (which builds them).
"""

from jobs.store.base_model_registry import BaseModelRecord
from jobs.store.db import StoreError, StoreVersionError, default_store_url, redact_url
from jobs.store.job_store import JobStore
from jobs.store.records import IdempotencyConflict, JobEvent, JobNotFound, JobRecord, Metric, OwnershipLost

__all__ = [
    "BaseModelRecord", "IdempotencyConflict", "JobEvent", "JobNotFound", "JobRecord", "JobStore", "Metric",
    "OwnershipLost", "StoreError", "StoreVersionError", "default_store_url", "redact_url",
]
