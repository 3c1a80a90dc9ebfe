"""Named queries on the files table, and the statuses of a file's server-side check.

Callers pass an owner; a file of another owner is never found.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from tuneforge.errors import NotFoundError
from tuneforge.store.tables import FileRow

VISIBLE = "ready"
# An upload that was opened but not finished: the bytes are still to come, or `/preprocess` is.
UNFINISHED = ("uploading", "uploaded")
# Uploads whose bytes go straight to the object store through presigned URLs: the server sees none of their PUTs,
# so they count as idle only once their URLs have expired (`stale_upload_ids`).
DIRECT_KINDS = ("direct", "direct-multipart")


class FileProcessingStatus(StrEnum):
    """A file's `processing_status`, spelled as the together SDK's file object spells it (each name is its value).

    The server's check goes QUEUED -> RUNNING -> COMPLETED | INVALID_FORMAT, or FAILED when the check itself broke;
    PENDING is in the SDK's list too, and tuneforge never sets it. A file not yet sent to `/preprocess` has none.
    """

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    INVALID_FORMAT = "INVALID_FORMAT"
    FAILED = "FAILED"


# The statuses of a file whose check has not ended yet.
STILL_CHECKING = (FileProcessingStatus.PENDING, FileProcessingStatus.QUEUED, FileProcessingStatus.RUNNING)


def insert_file(
    session: Session,
    *,
    file_id: str,
    owner: str,
    filename: str,
    purpose: str,
    file_type: str,
    checksum: str,
    upload_kind: str = "single",
    upload_id: str | None = None,
    expected_bytes: int | None = None,
    num_parts: int | None = None,
    storage_upload_id: str | None = None,
) -> FileRow:
    now = time.time()
    row = FileRow(
        id=file_id,
        owner=owner,
        filename=filename,
        purpose=purpose,
        file_type=file_type,
        checksum=checksum,
        bytes=0,
        state="uploading",
        processing_status=None,
        validation_report=None,
        upload_kind=upload_kind,
        upload_id=upload_id,
        expected_bytes=expected_bytes,
        num_parts=num_parts,
        storage_upload_id=storage_upload_id,
        error=None,
        created_at=int(now),
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, file_id: str, owner: str, states: tuple[str, ...] = (VISIBLE,)) -> FileRow:
    """The owner's file in one of `states`; NotFoundError otherwise (also for another owner's file)."""
    row = session.get(FileRow, file_id)
    if row is None or row.owner != owner or row.state not in states:
        raise NotFoundError(f"file {file_id!r} not found", param="id")
    return row


def is_visible(session: Session, *, file_id: str, owner: str) -> bool:
    """Whether the owner's file is ready, read from the database now (not from the session's cache). On PostgreSQL
    the row is locked (FOR SHARE) until the transaction ends, so a delete of the file waits for it and then sees
    what it wrote; SQLite's one writer at a time gives the same order."""
    stmt = select(FileRow).where(FileRow.id == file_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(read=True)
    row = session.scalars(stmt).first()
    return row is not None and row.owner == owner and row.state == VISIBLE


def get_file_any_owner(session: Session, *, file_id: str) -> FileRow | None:
    """For signed upload URLs, which carry no API key: the signature names the file."""
    return session.get(FileRow, file_id)


def list_files(session: Session, *, owner: str) -> list[FileRow]:
    stmt = select(FileRow).where(FileRow.owner == owner, FileRow.state == VISIBLE).order_by(FileRow.created_at)
    return list(session.scalars(stmt))


def find_duplicate(session: Session, *, owner: str, checksum: str, purpose: str) -> FileRow | None:
    stmt = select(FileRow).where(
        FileRow.owner == owner,
        FileRow.checksum == checksum,
        FileRow.purpose == purpose,
        FileRow.state == VISIBLE,
    )
    return session.scalars(stmt).first()


def set_state(session: Session, *, file_id: str, from_states: tuple[str, ...], to_state: str, **values: Any) -> bool:
    """Move a file from one of `from_states` to `to_state` in one conditional update."""
    result = session.execute(
        update(FileRow)
        .where(FileRow.id == file_id, FileRow.state.in_(from_states))
        .values(state=to_state, updated_at=time.time(), **values)
    )
    return bool(getattr(result, "rowcount", 0))


def set_processing(
    session: Session,
    *,
    file_id: str,
    status: FileProcessingStatus,
    report: dict[str, Any] | None = None,
    from_statuses: tuple[FileProcessingStatus | None, ...] | None = None,
) -> bool:
    stmt = update(FileRow).where(FileRow.id == file_id, FileRow.state == VISIBLE)
    if from_statuses is not None:
        stmt = stmt.where(FileRow.processing_status.in_([str(s) for s in from_statuses if s is not None]))
    values: dict[str, Any] = {"processing_status": str(status), "updated_at": time.time()}
    if report is not None:
        values["validation_report"] = report
    result = session.execute(stmt.values(**values))
    return bool(getattr(result, "rowcount", 0))


def files_with_processing(session: Session, *, statuses: tuple[FileProcessingStatus, ...]) -> list[FileRow]:
    stmt = select(FileRow).where(FileRow.state == VISIBLE, FileRow.processing_status.in_([str(s) for s in statuses]))
    return list(session.scalars(stmt))


def pending_bytes(session: Session, *, owner: str, excluding: str | None = None) -> int:
    """The bytes `owner` holds in unfinished uploads (besides `excluding`): a multipart upload's declared file size
    (reserved at initiate), a single upload's bytes (received so far while its PUT runs, all of them once stored)."""
    held = func.coalesce(FileRow.expected_bytes, FileRow.bytes)
    stmt = select(func.coalesce(func.sum(held), 0)).where(FileRow.owner == owner, FileRow.state.in_(UNFINISHED))
    if excluding is not None:
        stmt = stmt.where(FileRow.id != excluding)
    return int(session.scalar(stmt) or 0)


def lock_owner_uploads(session: Session, *, owner: str) -> None:
    """Serialise the transactions that reserve room in `owner`'s unfinished uploads, until this one ends. On
    PostgreSQL a transaction advisory lock; SQLite has one writer at a time, so a caller that writes (inserts its
    row) before it sums `pending_bytes` is ordered after every other such writer already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"uploads:{owner}"})


def touch_upload(session: Session, *, file_id: str, received: int | None = None) -> bool:
    """Mark an upload whose bytes are still to come as active now (for a single upload, with the bytes received so
    far). False when no such upload is left (it was finished, aborted or swept)."""
    values: dict[str, Any] = {"updated_at": time.time()}
    if received is not None:
        values["bytes"] = received
    result = session.execute(
        update(FileRow).where(FileRow.id == file_id, FileRow.state == "uploading").values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def _idle(older_than: float, direct_older_than: float) -> ColumnElement[bool]:
    """Unfinished and idle: no activity since `older_than`, or for a direct upload since `direct_older_than`."""
    direct = FileRow.upload_kind.in_(DIRECT_KINDS)
    return and_(
        FileRow.state.in_(UNFINISHED),
        or_(
            and_(~direct, FileRow.updated_at < older_than),
            and_(direct, FileRow.updated_at < direct_older_than),
        ),
    )


def stale_upload_ids(session: Session, *, older_than: float, direct_older_than: float) -> list[tuple[str, str | None]]:
    """Unfinished uploads with no activity since `older_than` (direct ones: since `direct_older_than`), each with
    its multipart upload's id in the object store (None unless it is a direct multipart upload)."""
    stmt = select(FileRow.id, FileRow.storage_upload_id).where(_idle(older_than, direct_older_than))
    return [(i, u) for i, u in session.execute(stmt)]


def delete_stale_upload(session: Session, *, file_id: str, older_than: float, direct_older_than: float) -> bool:
    """Delete the row of an upload that is still unfinished and still idle, in one conditional statement: one
    finished or touched since it was found stays."""
    result = session.execute(
        delete(FileRow)
        .where(FileRow.id == file_id, _idle(older_than, direct_older_than))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def delete_row(session: Session, *, file_id: str) -> None:
    row = session.get(FileRow, file_id)
    if row is not None:
        session.delete(row)
