"""SQLAlchemy 2.0 tables: API keys and files (jobs come with the fine-tuning work).

Rows only; the wire shapes live in `api/*/schemas.py` and are built from these by the services.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200), index=True)
    # sha256 of the secret; the secret itself is shown once, at creation, and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class FileRow(Base):
    """One uploaded file. `state` tracks the upload; `processing_status` the server-side check."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    file_type: Mapped[str] = mapped_column(String(16))
    checksum: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # uploading -> uploaded (bytes stored and checksum verified) -> ready (finalised, visible);
    # deleted rows stay as tombstones so that ids are never reused.
    state: Mapped[str] = mapped_column(String(16))
    processing_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    validation_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    upload_kind: Mapped[str] = mapped_column(String(16), default="single")
    upload_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A direct multipart upload's id in the object store (S3's UploadId: opaque, and longer than ours).
    storage_upload_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    expected_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    num_parts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_files_owner_state", "owner", "state"),
        Index("ix_files_owner_checksum", "owner", "checksum"),
    )


class JobRow(Base):
    """One fine-tuning job. `params` holds its JobPlan (train/spec.py), stored once; the columns hold what is
    queried. `lease_owner` and `heartbeat_at` are the lease of the worker whose process runs it."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(300))
    output_name: Mapped[str] = mapped_column(String(400), unique=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_hash: Mapped[str] = mapped_column(String(64))
    # owner + request hash while a retry of the same request should get this job back; unique, so two identical
    # requests racing each other make one job. Released (NULL) when the window has passed and a new one comes.
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Secrets the run needs (the W&B key); never serialised into an answer, an event or a log.
    secrets: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    runner: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    deleted: Mapped[bool] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_jobs_owner_created", "owner", "created_at"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ux_jobs_idempotency_key", "idempotency_key", unique=True),
    )


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class JobMetricRow(Base):
    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer)
    logged_at: Mapped[float] = mapped_column(Float)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)


class CheckpointRow(Base):
    __tablename__ = "job_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # intermediate | final
    path: Mapped[str] = mapped_column(String(400))  # blob prefix of the checkpoint folder
    created_at: Mapped[float] = mapped_column(Float)


class EndpointRow(Base):
    """One dedicated endpoint. `name` is what callers pass as `model`; `state` moves only through
    `store/endpoints.transition` (the table in `store/endpoint_states.py`)."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(400), unique=True)
    display_name: Mapped[str] = mapped_column(String(400))
    model: Mapped[str] = mapped_column(String(400))
    hardware: Mapped[str] = mapped_column(String(100))
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    inactive_timeout: Mapped[int | None] = mapped_column(Integer, nullable=True)  # minutes; None / 0: never
    replica_bytes: Mapped[int] = mapped_column(BigInteger)  # memory one replica needs (the serving budget's unit)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_endpoints_owner_created", "owner", "created_at"),)


class EndpointAdapterRow(Base):
    """A LoRA output of the endpoint's base model that its replicas also serve, as `<endpoint name>:<model>`."""

    __tablename__ = "endpoint_adapters"

    endpoint_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(400), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class EndpointEventRow(Base):
    __tablename__ = "endpoint_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
