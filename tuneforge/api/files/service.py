"""Files: the upload protocol (single PUT and multipart), listing, download and deletion.

Bytes are streamed into the BlobStore under `files/<id>` and verified against the client's SHA-256
before the row leaves the `uploading` state; a file is listed only once it is complete and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from tuneforge.api.files.schemas import FILE_TYPES, PURPOSES, FilePublic
from tuneforge.errors import (
    ConflictError,
    DuplicateFileError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    StorageError,
    TuneForgeError,
)
from tuneforge.ids import new_file_id, new_upload_id
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore, BlobWriter
from tuneforge.storage.direct import DirectUploads
from tuneforge.storage.layout import file_key
from tuneforge.store import Database
from tuneforge.store import files as repo
from tuneforge.store import jobs as jobs_repo
from tuneforge.store.files import FileProcessingStatus
from tuneforge.store.tables import FileRow

log = logging.getLogger("tuneforge.files")

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PARTS = 10_000
FLUSH_BYTES = 4 << 20


def beat_interval(idle_s: float) -> float:
    """How often an upload whose bytes are being received is marked active: well within the idle time."""
    return max(0.05, min(idle_s / 4, 5.0))


def sweep_interval(idle_s: float) -> float:
    """How often the server looks for idle uploads while it runs."""
    return max(0.05, min(idle_s / 4, 60.0))


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


def staging_key(file_id: str) -> str:
    """Where a direct single PUT lands: moved to the file's key at /preprocess, so a second PUT with the same URL
    (valid until it expires) can never change bytes that were verified."""
    return f"uploads/{file_id}/body"


def direct_store(blobs: BlobStore, settings: Settings) -> DirectUploads | None:
    """The object store's presigned URLs, when uploads go straight to it; None when the server receives them."""
    return blobs.direct if settings.direct_uploads else None


def direct_idle_s(settings: Settings) -> float:
    """How long a direct upload may go unseen before it counts as abandoned: its URLs must have expired, since the
    server sees none of its PUTs."""
    return max(settings.stale_upload_s, float(settings.upload_url_ttl_s))


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
    db: Database,
    settings: Settings,
    *,
    owner: str,
    purpose: str,
    file_name: str,
    file_type: str,
    checksum: str,
    direct: bool = False,
) -> FileRow:
    """Open a single-PUT upload; `direct`: its bytes go to the object store's presigned URL, not to the server."""
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
            upload_kind="direct" if direct else "single",
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
    direct: DirectUploads | None = None,
) -> FileRow:
    """Open a multipart upload. With `direct`, the object store's own multipart upload is opened on the file's key
    (nothing is visible there until it is completed) and the parts go to it; it is aborted again if the upload is
    refused here."""
    digest = check_upload_fields(purpose=purpose, file_name=file_name, file_type=file_type, checksum=checksum)
    if file_size <= 0:
        raise InvalidRequestError("file_size must be a positive number of bytes", param="file_size")
    if file_size > settings.max_file_bytes:
        raise PayloadTooLargeError(
            f"file_size {file_size} is over the limit of {settings.max_file_bytes} bytes", param="file_size"
        )
    if not 1 <= num_parts <= min(MAX_PARTS, file_size):
        raise InvalidRequestError(f"num_parts must be between 1 and {MAX_PARTS}", param="num_parts")
    file_id = new_file_id()
    storage_upload_id = direct.start_multipart(blob_key(file_id)) if direct is not None else None
    try:
        return _insert_multipart(db, settings, owner=owner, file_id=file_id, purpose=purpose, file_name=file_name,
                                 file_type=file_type, digest=digest, file_size=file_size, num_parts=num_parts,
                                 storage_upload_id=storage_upload_id)  # fmt: skip
    except BaseException:
        if direct is not None and storage_upload_id is not None:
            direct.abort_multipart(blob_key(file_id), storage_upload_id)
        raise


def _insert_multipart(
    db: Database,
    settings: Settings,
    *,
    owner: str,
    file_id: str,
    purpose: str,
    file_name: str,
    file_type: str,
    digest: str,
    file_size: int,
    num_parts: int,
    storage_upload_id: str | None,
) -> FileRow:
    with db.session() as s:
        _refuse_duplicate(s, owner=owner, checksum=digest, purpose=purpose)
        # The row is written before the owner's other uploads are summed, in one transaction (and under the owner's
        # lock on PostgreSQL): two initiates at once are ordered, and the second sees the first's reservation.
        repo.lock_owner_uploads(s, owner=owner)
        row = repo.insert_file(
            s,
            file_id=file_id,
            owner=owner,
            filename=file_name,
            purpose=purpose,
            file_type=file_type,
            checksum=digest,
            upload_kind="multipart" if storage_upload_id is None else "direct-multipart",
            upload_id=new_upload_id(),
            expected_bytes=file_size,
            num_parts=num_parts,
            storage_upload_id=storage_upload_id,
        )
        held = repo.pending_bytes(s, owner=owner, excluding=row.id)
        if held + file_size > settings.max_pending_upload_bytes:
            raise PayloadTooLargeError(f"file_size {file_size} is {_over_pending(settings, held)}", param="file_size")
        return row


def _over_pending(settings: Settings, held: int) -> str:
    cap = settings.max_pending_upload_bytes
    return (
        f"over the limit of {cap} bytes per owner in unfinished uploads: {held} bytes are in use by your other "
        f"unfinished uploads (a multipart upload holds its file_size from initiate), leaving {max(cap - held, 0)}; "
        f"finishing or aborting other uploads frees theirs, and an upload idle for {settings.stale_upload_s:g} s is "
        "removed"
    )


@dataclass
class Intake:
    """One PUT's body as it is received: the bytes so far, the most it may hold (and why), and an error that ends
    it early, set while it runs by `kept_active` (its upload was aborted, finished by another PUT, or swept)."""

    limit: int
    why: str
    received: int = 0
    stopped: TuneForgeError | None = None

    def too_large(self, size: int | None = None) -> PayloadTooLargeError:
        return PayloadTooLargeError(("upload" if size is None else f"upload of {size} bytes") + f" is {self.why}")


def _single_limit(settings: Settings, held: int) -> tuple[int, str]:
    """The most a single PUT may hold when the owner's other unfinished uploads hold `held` bytes."""
    room = max(settings.max_pending_upload_bytes - held, 0)
    if room >= settings.max_file_bytes:
        return settings.max_file_bytes, f"over the limit of {settings.max_file_bytes} bytes"
    return room, _over_pending(settings, held)


def begin_single_put(db: Database, settings: Settings, *, file_id: str) -> tuple[FileRow, Intake]:
    """A single PUT starts: its upload is marked active, and may take at most the file limit, or what the owner's
    other unfinished uploads leave of theirs (its own bytes count as they arrive, see `kept_active`)."""
    row = pending_upload(db, file_id=file_id, kind="single")
    with db.session() as s:
        held = repo.pending_bytes(s, owner=row.owner, excluding=row.id)
    limit, why = _single_limit(settings, held)
    return row, Intake(limit=limit, why=why)


def begin_part_put(db: Database, blobs: BlobStore, *, file_id: str, part_number: int) -> tuple[FileRow, Intake]:
    """A part PUT starts: its upload is marked active, and the part may hold at most `part_limit` (the room was
    reserved at initiate)."""
    row = pending_upload(db, file_id=file_id, kind="multipart")
    if not 1 <= part_number <= (row.num_parts or 0):
        raise InvalidRequestError(f"part number {part_number} is outside 1..{row.num_parts}", param="part_number")
    limit = part_limit(blobs, row, part_number)
    if limit <= 0:
        raise PayloadTooLargeError(f"the parts already received hold the declared {row.expected_bytes} bytes of "
                                   f"file {file_id}; part {part_number} has no room left")  # fmt: skip
    return row, Intake(limit=limit, why=f"over the limit of {limit} bytes")


def _ended(row: FileRow | None, file_id: str) -> TuneForgeError:
    """Why an upload whose bytes were being received takes no more."""
    if row is None or row.state == "deleted":
        return NotFoundError(f"upload for file {file_id!r} not found: it was aborted, or removed when idle")
    return ConflictError(f"file {file_id!r} has already been uploaded")


@asynccontextmanager
async def kept_active(
    db: Database, settings: Settings, *, row: FileRow, intake: Intake, writer: BlobWriter, single: bool
) -> AsyncIterator[None]:
    """While a PUT's body is received, every `beat_interval`: its upload is marked active, and its temporary file
    too, so neither is swept however long the PUT takes; a single upload's bytes so far are recorded (they count
    against the owner's limit) and its own limit follows what the owner's other uploads hold now. An upload that is
    no longer in progress ends the PUT at its next chunk."""

    def beat() -> None:
        writer.touch()
        with db.session() as s:
            alive = repo.touch_upload(s, file_id=row.id, received=intake.received if single else None)
            held = repo.pending_bytes(s, owner=row.owner, excluding=row.id) if alive and single else None
            now = None if alive else s.get(FileRow, row.id)
        if not alive:
            intake.stopped = _ended(now, row.id)
        elif held is not None:
            intake.limit, intake.why = _single_limit(settings, held)

    async def beating() -> None:
        while intake.stopped is None:
            await anyio.sleep(beat_interval(settings.stale_upload_s))
            try:
                await anyio.to_thread.run_sync(beat)
            except Exception:  # a database hiccup does not end the upload; the next beat tries again
                log.exception("could not mark upload %s active", row.id)

    task = asyncio.create_task(beating())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def put_failed(db: Database, *, file_id: str, single: bool) -> None:
    """A PUT ended without storing anything: the upload was active until now, and a single upload holds no bytes."""
    try:
        with db.session() as s:
            repo.touch_upload(s, file_id=file_id, received=0 if single else None)
    except Exception:  # the PUT's own error is the one to report
        log.exception("could not record the failed PUT of upload %s", file_id)


def part_stored(db: Database, blobs: BlobStore, *, file_id: str) -> None:
    """A part PUT ended with its part stored: the upload is marked active. A part stored for an upload no longer in
    progress (aborted, swept or completed meanwhile) is removed with the upload's other parts, and the PUT fails."""
    with db.session() as s:
        if repo.touch_upload(s, file_id=file_id):
            return
        row = s.get(FileRow, file_id)
    blobs.delete_prefix(f"uploads/{file_id}")
    raise _ended(row, file_id)


async def receive_body(body: AsyncIterator[bytes], writer: BlobWriter, *, intake: Intake, hashers: list[Any]) -> int:
    """Stream a request body into `writer`, updating `hashers` and `intake.received`; returns the byte count.

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
        if intake.stopped is not None:
            raise intake.stopped
        total += len(chunk)
        if total > intake.limit:
            raise intake.too_large()
        intake.received = total
        buf += chunk
        if len(buf) >= FLUSH_BYTES:
            block = bytes(buf)
            buf.clear()
            await anyio.to_thread.run_sync(flush, block)
    if buf:
        await anyio.to_thread.run_sync(flush, bytes(buf))
    return total


def pending_upload(db: Database, *, file_id: str, kind: str) -> FileRow:
    """The upload whose bytes a PUT brings, marked active now."""
    with db.session() as s:
        row = repo.get_file_any_owner(s, file_id=file_id)
        if row is None or row.state == "deleted":
            raise NotFoundError(f"upload for file {file_id!r} not found")
        if row.upload_kind != kind:
            raise InvalidRequestError(f"file {file_id!r} was opened as a {row.upload_kind} upload")
        if row.state != "uploading" or not repo.touch_upload(s, file_id=file_id):
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


def mark_uploaded(db: Database, blobs: BlobStore, *, file_id: str, size: int) -> None:
    """`uploading` -> `uploaded`, once the bytes are stored under the file's key. If the upload is gone meanwhile
    (aborted, or swept when idle) the stored bytes are removed again and it is a 404; already uploaded (by another
    request, whose bytes stay) a 409."""
    with db.session() as s:
        if repo.set_state(s, file_id=file_id, from_states=("uploading",), to_state="uploaded", bytes=size):
            return
        row = s.get(FileRow, file_id)
    error = _ended(row, file_id)
    if isinstance(error, NotFoundError):
        blobs.delete(blob_key(file_id))
    raise error


def preprocess(db: Database, blobs: BlobStore, settings: Settings, *, file_id: str, owner: str) -> tuple[FileRow, bool]:
    """/preprocess: a direct single upload's bytes are first taken in from where the client PUT them (moved to the
    file's key, measured and verified); then the file is finalised (`finalise`)."""
    with db.session() as s:
        row = s.get(FileRow, file_id)
        if row is None or row.owner != owner or row.state == "deleted":
            raise NotFoundError(f"file {file_id!r} not found", param="id")
        pending_direct = row.state == "uploading" and row.upload_kind == "direct"
    if pending_direct:
        _take_in_direct_put(db, blobs, settings, row)
    return finalise(db, file_id=file_id, owner=owner)


def _direct_of(blobs: BlobStore) -> DirectUploads:
    if blobs.direct is None:
        raise StorageError("this upload went straight to an object store, but the storage is no longer one")
    return blobs.direct


def _take_in_direct_put(db: Database, blobs: BlobStore, settings: Settings, row: FileRow) -> None:
    """Move a direct PUT's bytes from the staging key to the file's key, inside the object store (no byte passes
    through this server but for the hash), verify them, and mark the upload `uploaded`. Called again after a crash
    between the move and the mark, it finds the bytes already moved."""
    direct, staging, key = _direct_of(blobs), staging_key(row.id), blob_key(row.id)
    if blobs.exists(staging):
        size = blobs.size(staging)
        if size > settings.max_file_bytes:
            blobs.delete(staging)
            raise PayloadTooLargeError(f"upload of {size} bytes is over the limit of {settings.max_file_bytes} bytes")
        direct.move(staging, key)
    elif not blobs.exists(key):
        raise InvalidRequestError(
            f"file {row.id!r} has no content yet: PUT the bytes to the upload URL before /preprocess"
        )
    size = verify_stored(blobs, row)
    with contextlib.suppress(ConflictError):  # another /preprocess of the same upload took it in first
        mark_uploaded(db, blobs, file_id=row.id, size=size)


def verify_stored(blobs: BlobStore, row: FileRow, *, expected_bytes: int | None = None) -> int:
    """Hash the bytes stored under the file's key, streamed, against the client's SHA-256 (and size); bytes that
    do not match are removed and the upload stays open. Returns the size."""
    sha, size = hashlib.sha256(), 0
    with blobs.open(blob_key(row.id)) as fh:
        while block := fh.read(FLUSH_BYTES):
            sha.update(block)
            size += len(block)
    problem = None
    if size == 0:
        problem = "the file is empty: a dataset needs at least one sample"
    elif expected_bytes is not None and size != expected_bytes:
        problem = f"the parts add up to {size} bytes, but file_size was {expected_bytes}"
    elif sha.hexdigest() != row.checksum:
        problem = (f"checksum mismatch: the bytes received hash to {sha.hexdigest()}, but the upload declared "
                   f"{row.checksum}")  # fmt: skip
    if problem is not None:
        blobs.delete(blob_key(row.id))
        raise InvalidRequestError(problem, param="checksum" if "checksum" in problem else None)
    return size


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
    db: Database,
    blobs: BlobStore,
    *,
    owner: str,
    file_id: str,
    upload_id: str,
    parts: list[tuple[int, str]],
    idle_s: float,
) -> FileRow:
    """Join the parts in order into the final blob, verifying every ETag, the size and the checksum. The upload is
    marked active as the join starts and while it runs, so an upload idle for `idle_s` is swept, never one being
    completed."""
    with db.session() as s:
        row = repo.get_file(s, file_id=file_id, owner=owner, states=("uploading",))
        repo.touch_upload(s, file_id=file_id)
    if row.upload_kind not in ("multipart", "direct-multipart") or row.upload_id != upload_id:
        raise InvalidRequestError(f"upload_id {upload_id!r} does not belong to file {file_id!r}", param="upload_id")
    numbers = [n for n, _ in parts]
    expected = list(range(1, (row.num_parts or 0) + 1))
    if sorted(numbers) != expected:
        raise InvalidRequestError(
            f"parts must list each part number 1..{row.num_parts} exactly once; got {sorted(numbers)[:20]}",
            param="parts",
        )
    if row.upload_kind == "direct-multipart":
        # The object store joins the parts (checking each ETag) into the file's key; then the whole is verified.
        _direct_of(blobs).complete_multipart(blob_key(file_id), row.storage_upload_id or "", parts)
        size = verify_stored(blobs, row, expected_bytes=row.expected_bytes)
        mark_uploaded(db, blobs, file_id=file_id, size=size)
        return finalise(db, file_id=file_id, owner=owner)[0]
    etags = {n: e.strip('"') for n, e in parts}
    sha = hashlib.sha256()
    writer = blobs.writer(blob_key(file_id))
    total = 0
    beat_s, last_beat = beat_interval(idle_s), time.monotonic()
    try:
        for n in expected:
            if time.monotonic() - last_beat >= beat_s:
                with db.session() as s:
                    repo.touch_upload(s, file_id=file_id)
                writer.touch()
                last_beat = time.monotonic()
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
    mark_uploaded(db, blobs, file_id=file_id, size=total)
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
        storage_upload_id = row.storage_upload_id
        repo.delete_row(s, file_id=file_id)
    if storage_upload_id is not None:
        _direct_of(blobs).abort_multipart(blob_key(file_id), storage_upload_id)
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


def sweep_stale_uploads(db: Database, blobs: BlobStore, *, idle_s: float, direct_idle_s: float | None = None) -> int:
    """Forget uploads that never finished and saw no activity for `idle_s` (no PUT of their bytes or a part
    started, ran or ended; no /complete), and direct uploads opened more than `direct_idle_s` ago (default
    `idle_s`; their PUTs go to the object store, unseen here): their rows, parts and stored bytes, which were never
    visible, a direct multipart upload in the object store, and temporary files of writes as old (a PUT cut short
    by a crash). A row goes only while it is still unfinished and still idle, in one conditional statement: a file
    finished or touched meanwhile stays; files that finished and jobs are never looked at."""
    now = time.time()
    cutoff, direct_cutoff = now - idle_s, now - (idle_s if direct_idle_s is None else direct_idle_s)
    with db.session() as s:
        candidates = repo.stale_upload_ids(s, older_than=cutoff, direct_older_than=direct_cutoff)
        gone = [
            (i, u)
            for i, u in candidates
            if repo.delete_stale_upload(s, file_id=i, older_than=cutoff, direct_older_than=direct_cutoff)
        ]
    for file_id, storage_upload_id in gone:
        if storage_upload_id is not None and blobs.direct is not None:
            blobs.direct.abort_multipart(blob_key(file_id), storage_upload_id)
        blobs.delete_prefix(f"uploads/{file_id}")
        blobs.delete(blob_key(file_id))
    blobs.sweep_temporary(idle_s)
    return len(gone)


async def sweep_while_serving(db: Database, blobs: BlobStore, *, idle_s: float, direct_idle_s: float) -> None:
    """Sweep idle uploads every `sweep_interval(idle_s)` until cancelled (the app's lifespan runs this)."""
    sweep = functools.partial(sweep_stale_uploads, db, blobs, idle_s=idle_s, direct_idle_s=direct_idle_s)
    while True:
        await anyio.sleep(sweep_interval(idle_s))
        try:
            swept = await anyio.to_thread.run_sync(sweep)
        except Exception:  # a database or storage hiccup: the next round tries again
            log.exception("sweeping idle uploads failed")
        else:
            if swept:
                log.info("%d idle uploads removed", swept)
