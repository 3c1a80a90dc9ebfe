"""Files: the upload protocol (single PUT and multipart), listing, download and deletion.

Bytes are streamed into the BlobStore under `files/<id>` and verified against the client's SHA-256
before the row leaves the `uploading` state; a file is listed only once it is complete and checked.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from tuneforge.api.files.schemas import FILE_TYPES, PURPOSES, FilePublic
from tuneforge.errors import (
    ConflictError,
    DuplicateFileError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
)
from tuneforge.ids import new_file_id, new_upload_id
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore, BlobWriter
from tuneforge.storage.layout import file_key
from tuneforge.store import Database
from tuneforge.store import files as repo
from tuneforge.store import jobs as jobs_repo
from tuneforge.store.files import FileProcessingStatus
from tuneforge.store.tables import FileRow

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PARTS = 10_000
FLUSH_BYTES = 4 << 20


def blob_key(file_id: str) -> str:
    return file_key(file_id)


MIN_PART_BYTES = 5 << 20  # the together SDK's smallest part (S3's): it never splits into parts below this


def part_limit(blobs: BlobStore, row: FileRow, part_number: int) -> int:
    """The most bytes part `part_number` of a multipart upload may hold: the declared part size (the file split
    evenly into its parts, as the SDK splits it, and at least the SDK's smallest part), and never more than what the
    declared file size leaves after the parts already stored (a part sent again replaces its earlier bytes)."""
    expected, parts = row.expected_bytes or 0, row.num_parts or 1
    per_part = min(expected, max(-(-expected // parts), MIN_PART_BYTES))
    this = part_key(row.id, part_number)
    stored = sum(blobs.size(key) for key in blobs.list(f"uploads/{row.id}/") if key != this)  # one listing
    return min(per_part, expected - stored)


def part_key(file_id: str, part: int) -> str:
    return f"uploads/{file_id}/part-{part:05d}"


def to_public(row: FileRow) -> FilePublic:
    report = row.validation_report
    return FilePublic(
        id=row.id,
        bytes=row.bytes if row.state != "uploading" else 0,
        created_at=row.created_at,
        filename=row.filename,
        file_type=row.file_type,
        processed=row.processing_status == FileProcessingStatus.COMPLETED,
        purpose=row.purpose,
        processing_status=row.processing_status,
        validation_report=report,
        line_count=(report or {}).get("nlines"),
    )


def check_upload_fields(*, purpose: str, file_name: str, file_type: str, checksum: str) -> str:
    """Validate the fields that open an upload; every problem is named. Returns the normalised checksum."""
    problems = []
    if purpose not in PURPOSES:
        problems.append(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    if file_type not in FILE_TYPES:
        problems.append(f"file_type {file_type!r} is not one of {', '.join(FILE_TYPES)}")
    name_problem = _file_name_problem(file_name)
    if name_problem:
        problems.append(name_problem)
    elif file_type in FILE_TYPES and not file_name.lower().endswith("." + file_type):
        problems.append(f"file_name {file_name!r} does not end in .{file_type} (file_type is {file_type!r})")
    if file_type == "csv" and purpose in PURPOSES and purpose != "eval":
        problems.append(f"CSV files are accepted only for purpose 'eval', not {purpose!r}")
    if file_type == "parquet" and purpose == "eval":
        problems.append("Parquet files are not accepted for purpose 'eval'")
    digest = checksum.strip().lower()
    if not SHA256_RE.match(digest):
        problems.append("checksum must be the file's SHA-256 as 64 hex characters")
    if problems:
        first_param = problems[0].split(" ", 1)[0]
        raise InvalidRequestError("Invalid upload: " + "; ".join(problems), param=first_param)
    return digest


def _file_name_problem(name: str) -> str | None:
    if not name or not name.strip():
        return "file_name is empty"
    if "/" in name or "\\" in name or "\x00" in name:
        return f"file_name {name!r} must be a bare file name without path separators"
    if name in (".", "..") or len(name) > 255:
        return f"file_name {name!r} is not a valid file name"
    if any(ord(c) < 32 for c in name):
        return "file_name contains control characters"
    return None


def open_single_upload(
    db: Database, settings: Settings, *, owner: str, purpose: str, file_name: str, file_type: str, checksum: str
) -> FileRow:
    digest = check_upload_fields(purpose=purpose, file_name=file_name, file_type=file_type, checksum=checksum)
    with db.session() as s:
        _refuse_duplicate(s, owner=owner, checksum=digest, purpose=purpose)
        return repo.insert_file(
            s,
            file_id=new_file_id(),
            owner=owner,
            filename=file_name,
            purpose=purpose,
            file_type=file_type,
            checksum=digest,
        )


def _refuse_duplicate(s: Any, *, owner: str, checksum: str, purpose: str) -> None:
    dup = repo.find_duplicate(s, owner=owner, checksum=checksum, purpose=purpose)
    if dup is not None:
        raise DuplicateFileError(
            f"A file with the same content already exists: {dup.id} ({dup.filename})", file_id=dup.id
        )


def open_multipart_upload(
    db: Database,
    settings: Settings,
    *,
    owner: str,
    purpose: str,
    file_name: str,
    file_type: str,
    checksum: str,
    file_size: int,
    num_parts: int,
) -> FileRow:
    digest = check_upload_fields(purpose=purpose, file_name=file_name, file_type=file_type, checksum=checksum)
    if file_size <= 0:
        raise InvalidRequestError("file_size must be a positive number of bytes", param="file_size")
    if file_size > settings.max_file_bytes:
        raise PayloadTooLargeError(
            f"file_size {file_size} is over the limit of {settings.max_file_bytes} bytes", param="file_size"
        )
    if not 1 <= num_parts <= min(MAX_PARTS, file_size):
        raise InvalidRequestError(f"num_parts must be between 1 and {MAX_PARTS}", param="num_parts")
    with db.session() as s:
        _refuse_duplicate(s, owner=owner, checksum=digest, purpose=purpose)
        return repo.insert_file(
            s,
            file_id=new_file_id(),
            owner=owner,
            filename=file_name,
            purpose=purpose,
            file_type=file_type,
            checksum=digest,
            upload_kind="multipart",
            upload_id=new_upload_id(),
            expected_bytes=file_size,
            num_parts=num_parts,
        )


async def receive_body(body: AsyncIterator[bytes], writer: BlobWriter, *, limit: int, hashers: list[Any]) -> int:
    """Stream a request body into `writer`, updating `hashers`; returns the byte count.

    Hashing and writing run in a worker thread on blocks of a few MiB, so the event loop stays free
    and the server holds at most one block per upload in memory.
    """
    total = 0
    buf = bytearray()

    def flush(block: bytes) -> None:
        for h in hashers:
            h.update(block)
        writer.write(block)

    async for chunk in body:
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"upload is larger than the limit of {limit} bytes")
        buf += chunk
        if len(buf) >= FLUSH_BYTES:
            block = bytes(buf)
            buf.clear()
            await anyio.to_thread.run_sync(flush, block)
    if buf:
        await anyio.to_thread.run_sync(flush, bytes(buf))
    return total


def pending_upload(db: Database, *, file_id: str, kind: str) -> FileRow:
    with db.session() as s:
        row = repo.get_file_any_owner(s, file_id=file_id)
        if row is None or row.state == "deleted":
            raise NotFoundError(f"upload for file {file_id!r} not found")
        if row.upload_kind != kind:
            raise InvalidRequestError(f"file {file_id!r} was opened as a {row.upload_kind} upload")
        if row.state != "uploading":
            raise ConflictError(f"file {file_id!r} has already been uploaded")
        return row


def finish_single_upload(db: Database, *, row: FileRow, size: int, digest: str, declared: int | None) -> None:
    """Check the received bytes against the client's word; raises before anything is committed."""
    if declared is not None and size != declared:
        raise InvalidRequestError(f"upload truncated: received {size} of {declared} bytes")
    if size == 0:
        raise InvalidRequestError("the file is empty: a dataset needs at least one sample")
    if digest != row.checksum:
        raise InvalidRequestError(
            f"checksum mismatch: the bytes received hash to {digest}, but the upload declared {row.checksum}",
            param="checksum",
        )


def mark_uploaded(db: Database, *, file_id: str, size: int) -> None:
    with db.session() as s:
        if not repo.set_state(s, file_id=file_id, from_states=("uploading",), to_state="uploaded", bytes=size):
            raise ConflictError(f"file {file_id!r} has already been uploaded")


def finalise(db: Database, *, file_id: str, owner: str) -> tuple[FileRow, bool]:
    """`uploaded` -> `ready` and queued for validation. Returns the row and whether it changed now."""
    with db.session() as s:
        row = s.get(FileRow, file_id)
        if row is None or row.owner != owner or row.state == "deleted":
            raise NotFoundError(f"file {file_id!r} not found", param="id")
        if row.state == "ready":
            return row, False
        if row.state != "uploaded":
            raise InvalidRequestError(
                f"file {file_id!r} has no content yet: PUT the bytes to the upload URL before /preprocess"
            )
        repo.set_state(
            s,
            file_id=file_id,
            from_states=("uploaded",),
            to_state="ready",
            processing_status=str(FileProcessingStatus.QUEUED),
        )
        s.refresh(row)
        return row, True


def complete_multipart(
    db: Database, blobs: BlobStore, *, owner: str, file_id: str, upload_id: str, parts: list[tuple[int, str]]
) -> FileRow:
    """Join the parts in order into the final blob, verifying every ETag, the size and the checksum."""
    with db.session() as s:
        row = repo.get_file(s, file_id=file_id, owner=owner, states=("uploading",))
    if row.upload_kind != "multipart" or row.upload_id != upload_id:
        raise InvalidRequestError(f"upload_id {upload_id!r} does not belong to file {file_id!r}", param="upload_id")
    numbers = [n for n, _ in parts]
    expected = list(range(1, (row.num_parts or 0) + 1))
    if sorted(numbers) != expected:
        raise InvalidRequestError(
            f"parts must list each part number 1..{row.num_parts} exactly once; got {sorted(numbers)[:20]}",
            param="parts",
        )
    etags = {n: e.strip('"') for n, e in parts}
    sha = hashlib.sha256()
    writer = blobs.writer(blob_key(file_id))
    total = 0
    try:
        for n in expected:
            key = part_key(file_id, n)
            if not blobs.exists(key):
                raise InvalidRequestError(f"part {n} was never uploaded", param="parts")
            md5 = hashlib.md5(usedforsecurity=False)
            with blobs.open(key) as fh:
                while block := fh.read(FLUSH_BYTES):
                    md5.update(block)
                    sha.update(block)
                    writer.write(block)
                    total += len(block)
            if md5.hexdigest() != etags[n]:
                raise InvalidRequestError(f"part {n}: etag {etags[n]!r} does not match the stored part", param="parts")
        if total != row.expected_bytes:
            raise InvalidRequestError(f"the parts add up to {total} bytes, but file_size was {row.expected_bytes}")
        if sha.hexdigest() != row.checksum:
            raise InvalidRequestError(
                f"checksum mismatch: the joined parts hash to {sha.hexdigest()}, but the upload declared "
                f"{row.checksum}",
                param="checksum",
            )
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    blobs.delete_prefix(f"uploads/{file_id}")
    mark_uploaded(db, file_id=file_id, size=total)
    finalised, _ = finalise(db, file_id=file_id, owner=owner)
    return finalised


def abort_multipart(db: Database, blobs: BlobStore, *, owner: str, file_id: str, upload_id: str) -> None:
    """Forget an unfinished multipart upload and its parts. Another owner's or an unknown upload is a 404 (as a
    second abort is); a finished one is a 409 (delete the file instead)."""
    with db.session() as s:
        row = s.get(FileRow, file_id)
        if row is None or row.owner != owner or row.upload_id != upload_id:
            raise NotFoundError(f"no multipart upload {upload_id!r} of file {file_id!r}", param="upload_id")
        if row.state != "uploading":
            raise ConflictError(f"the multipart upload of file {file_id} is already complete: delete the file "
                                "instead", param="file_id")  # fmt: skip
        repo.delete_row(s, file_id=file_id)
    blobs.delete_prefix(f"uploads/{file_id}")


def list_files(db: Database, *, owner: str) -> list[FilePublic]:
    with db.session() as s:
        return [to_public(r) for r in repo.list_files(s, owner=owner)]


def retrieve_file(db: Database, *, owner: str, file_id: str) -> FileRow:
    with db.session() as s:
        return repo.get_file(s, file_id=file_id, owner=owner)


def delete_file(db: Database, blobs: BlobStore, *, owner: str, file_id: str) -> None:
    """Delete a file no live job reads (409 naming the jobs otherwise).

    The file is marked deleted first and the jobs checked after, in one transaction: the write lock it then holds
    means a create that would use the file either committed before (and is seen) or sees the file gone."""
    with db.session() as s:
        repo.get_file(s, file_id=file_id, owner=owner)
        repo.set_state(s, file_id=file_id, from_states=("ready",), to_state="deleted")
        users = [j.id for j in jobs_repo.live_jobs_using_file(s, file_id=file_id)]
        if users:
            raise ConflictError(
                f"file {file_id} is used by fine-tune job{'s' if len(users) > 1 else ''} {', '.join(users)}, which "
                "may still read it; delete it once they have ended (or cancel them first)",
                param="id",
            )
    blobs.delete(blob_key(file_id))


def stream_content(blobs: BlobStore, file_id: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with blobs.open(blob_key(file_id)) as fh:
        while block := fh.read(chunk):
            yield block


def sweep_stale_uploads(db: Database, blobs: BlobStore, *, older_than_s: float) -> int:
    """Forget uploads that never finished; their partial bytes were never visible."""
    cutoff = time.time() - older_than_s
    with db.session() as s:
        stale = repo.stale_uploads(s, older_than=cutoff)
        ids = [r.id for r in stale]
        for file_id in ids:
            repo.delete_row(s, file_id=file_id)
    for file_id in ids:
        blobs.delete_prefix(f"uploads/{file_id}")
        blobs.delete(blob_key(file_id))
    blobs.sweep_temporary(older_than_s)
    return len(ids)
