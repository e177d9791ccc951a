"""The job store's tables (SQLAlchemy 2). Times are UTC epoch seconds; JSON columns hold specs,
metrics and file hashes. Bump ``SCHEMA_VERSION`` with every change and add its migration."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 5  # 2: subspaces (IPT); 3: sweeps and their trials; 4: checkpoint manifests, event owners;
# 5: base model sources


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "peftfleet_schema"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class BaseModelRow(Base):
    __tablename__ = "base_models"
    fingerprint: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))  # the reference it was first registered under
    path: Mapped[str] = mapped_column(Text)
    model_type: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    # Where the weights came from (5): a Hub repo, revision and resolved commit, a folder, or a packaged
    # model, with each weight file's sha256. None for a base registered before version 5 until registered again.
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(200))
    task_name: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    runtime: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict
    )  # where it runs: Ray submission id, dashboard URL
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class JobEventRow(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str | None] = mapped_column(String(200))  # who held the job after the change (4)


class MetricRow(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_metrics_job_name_step", "job_id", "name", "step"),)


class AdapterRow(Base):
    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("base_models.fingerprint"), index=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    task: Mapped[str] = mapped_column(String(32))
    task_name: Mapped[str] = mapped_column(String(64), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of peftfleet.json, which hashes every other file
    files: Mapped[dict[str, str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer)
    num_parameters: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class AdapterTagRow(Base):
    __tablename__ = "adapter_tags"
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PromotionRow(Base):
    """At most one promoted adapter per (base, task name): the primary key says so."""

    __tablename__ = "promotions"
    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("base_models.fingerprint"), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id"))
    promoted_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("adapter_id"),)


class SubspaceRow(Base):
    """A fitted IPT subspace: a decoder from a small vector to a soft prompt, for one base."""

    __tablename__ = "subspaces"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("base_models.fingerprint"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of subspace.json, which hashes the tensors
    intrinsic_dim: Mapped[int] = mapped_column(Integer)
    num_virtual_tokens: Mapped[int] = mapped_column(Integer)
    sources: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the prompt adapters it was fitted on
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class SweepRow(Base):
    """A hyper-parameter search: its base spec, search space, scheduler, state and best trial."""

    __tablename__ = "sweeps"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # PENDING RUNNING SUCCEEDED FAILED INTERRUPTED
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the whole sweep spec as submitted
    metric: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(3))
    scheduler: Mapped[str] = mapped_column(String(16))
    experiment_path: Mapped[str | None] = mapped_column(Text)  # where Ray Tune keeps its state (for restore)
    runtime: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    best_job_id: Mapped[str | None] = mapped_column(String(32))
    best_adapter: Mapped[str | None] = mapped_column(String(64))
    best_value: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class SweepTrialRow(Base):
    """One trial of a sweep: the job it ran as and the values it sampled."""

    __tablename__ = "sweep_trials"
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    trial_id: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class CheckpointRow(Base):
    """A training checkpoint a job's rank 0 wrote: where, and the sha256 of every file in it, recorded
    when it was written so a restore reads only bytes the store vouches for."""

    __tablename__ = "checkpoints"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    folder: Mapped[str] = mapped_column(Text)
    files: Mapped[dict[str, str]] = mapped_column(JSON)  # path relative to the folder -> sha256
    created_at: Mapped[float] = mapped_column(Float)
