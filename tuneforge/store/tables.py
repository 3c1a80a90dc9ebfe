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
    expected_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    num_parts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_files_owner_state", "owner", "state"),
        Index("ix_files_owner_checksum", "owner", "checksum"),
    )
