"""Unfinished uploads are bounded: in the bytes one owner holds in them (a multipart upload reserves its file_size at
initiate, a single PUT counts its bytes as they arrive) and in time (an upload idle for `stale_upload_s` is swept).
The HTTP flows against a live server are in tests/e2e/test_e2e_bad_input.py; here the service and the store
functions every route goes through, on real SQLite and a local blob folder."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from sqlalchemy import update

from tuneforge.api.files import service
from tuneforge.errors import ConflictError, NotFoundError, PayloadTooLargeError
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore, open_blob_store
from tuneforge.store import Database, open_database
from tuneforge.store import files as repo
from tuneforge.store.tables import FileRow

pytestmark = pytest.mark.timeout(60)

FILE_MAX, PENDING_MAX = 1000, 2500


@dataclass
class Env:
    settings: Settings
    db: Database
    blobs: BlobStore
    root: Path  # the blob folder

    def multipart(self, owner: str = "alice", size: int = FILE_MAX) -> str:
        row = service.open_multipart_upload(
            self.db, self.settings, owner=owner, purpose="fine-tune", file_name="a.jsonl", file_type="jsonl",
            checksum=_sha(), file_size=size, num_parts=1,
        )  # fmt: skip
        return row.id

    def single(self, owner: str = "alice") -> str:
        row = service.open_single_upload(self.db, self.settings, owner=owner, purpose="fine-tune",
                                         file_name="a.jsonl", file_type="jsonl", checksum=_sha())  # fmt: skip
        return row.id

    def store(self, key: str, data: bytes = b"x" * 10) -> None:
        with self.blobs.writer(key) as w:
            w.write(data)

    def age(self, file_id: str, seconds: float = 100.0) -> None:
        with self.db.session() as s:
            s.execute(update(FileRow).where(FileRow.id == file_id).values(updated_at=time.time() - seconds))

    def state(self, file_id: str) -> str | None:
        with self.db.session() as s:
            row = s.get(FileRow, file_id)
            return None if row is None else row.state

    def pending(self, owner: str = "alice") -> int:
        with self.db.session() as s:
            return repo.pending_bytes(s, owner=owner)


def _sha() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    settings = Settings(home=tmp_path / "home", max_file_bytes=FILE_MAX, max_pending_upload_bytes=PENDING_MAX,
                        stale_upload_s=0.2)  # fmt: skip
    settings.ensure_home()
    db = open_database(settings.database_url)
    try:
        yield Env(settings, db, open_blob_store(settings.storage_url), Path(settings.storage_url))
    finally:
        db.close()


def test_pending_bytes_are_the_owners_unfinished_uploads(env: Env) -> None:
    reserved = env.multipart(size=700)  # reserved in full at initiate, whatever its parts hold yet
    arriving = env.single()
    with env.db.session() as s:
        assert repo.touch_upload(s, file_id=arriving, received=50)  # a PUT in progress, 50 bytes in
    stored = env.single()
    service.mark_uploaded(env.db, env.blobs, file_id=stored, size=30)  # stored, never /preprocess-ed
    finished = env.single()
    service.mark_uploaded(env.db, env.blobs, file_id=finished, size=900)
    service.finalise(env.db, file_id=finished, owner="alice")
    env.multipart(owner="bob", size=999)
    assert env.pending() == 700 + 50 + 30
    with env.db.session() as s:
        assert repo.pending_bytes(s, owner="alice", excluding=reserved) == 80
    assert env.pending("bob") == 999


def test_initiate_over_the_limit_is_refused_and_aborting_frees_it(env: Env) -> None:
    first, _ = env.multipart(), env.multipart()
    with pytest.raises(PayloadTooLargeError) as info:
        env.multipart(size=600)
    message = info.value.message
    assert f"limit of {PENDING_MAX}" in message and "2000 bytes are in use" in message and "aborting" in message
    assert env.pending() == 2000  # the refused upload left no row
    env.multipart(owner="bob")
    with env.db.session() as s:
        upload_id = s.get(FileRow, first).upload_id  # type: ignore[union-attr]
    service.abort_multipart(env.db, env.blobs, owner="alice", file_id=first, upload_id=upload_id or "")
    env.multipart(size=500)


def test_concurrent_initiates_never_pass_the_owners_limit(env: Env) -> None:
    """16 initiates of 1000 bytes at once against a limit of 2500: the reservation is written and summed in one
    transaction, so exactly two get in (not 'one upload too many')."""
    start = threading.Barrier(16)

    def attempt(_: int) -> str:
        start.wait()
        try:
            env.multipart()
        except PayloadTooLargeError:
            return "refused"
        return "ok"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count("ok") == 2, results
    assert env.pending() == 2000


def test_a_single_put_may_take_what_the_other_uploads_leave(env: Env) -> None:
    file_id = env.single()
    _, intake = service.begin_single_put(env.db, env.settings, file_id=file_id)
    assert intake.limit == FILE_MAX  # the file limit binds while the owner has room
    env.multipart(), env.multipart()
    _, intake = service.begin_single_put(env.db, env.settings, file_id=file_id)
    assert intake.limit == 500
    assert "leaving 500" in intake.too_large(600).message and "upload of 600 bytes" in intake.too_large(600).message


def test_a_put_in_progress_stays_active_counts_its_bytes_and_follows_the_room(env: Env) -> None:
    """While a single PUT receives: its row is touched (never idle) with the bytes so far, its temporary file is
    touched, and its limit shrinks when another upload takes the room; an upload that goes ends it."""
    file_id = env.single()
    row, intake = service.begin_single_put(env.db, env.settings, file_id=file_id)
    writer = env.blobs.writer(service.blob_key(file_id))
    writer.write(b"x" * 600)
    temp = next((env.root / ".tmp").iterdir())
    os.utime(temp, (time.time() - 100, time.time() - 100))
    intake.received = 600

    async def receiving(seconds: float) -> None:
        async with service.kept_active(env.db, env.settings, row=row, intake=intake, writer=writer, single=True):
            await anyio.sleep(seconds)

    env.age(file_id)
    env.multipart()
    anyio.run(receiving, 0.3)
    assert env.pending() == 1000 + 600
    assert intake.limit == 1000 and intake.stopped is None
    assert service.sweep_stale_uploads(env.db, env.blobs, idle_s=1) == 0
    assert env.state(file_id) == "uploading" and temp.exists()

    env.multipart(size=900)  # all the room this PUT's 600 bytes left: its own limit shrinks to what it holds
    anyio.run(receiving, 0.3)
    assert intake.limit == 600 and f"limit of {PENDING_MAX}" in intake.why and "1900 bytes are in use" in intake.why

    with env.db.session() as s:
        repo.delete_row(s, file_id=file_id)  # as an abort or a sweep does
    anyio.run(receiving, 0.3)
    assert isinstance(intake.stopped, NotFoundError)
    writer.abort()


def test_the_sweep_takes_idle_uploads_and_nothing_else(env: Env) -> None:
    finished = env.single()
    env.store(service.blob_key(finished))
    service.mark_uploaded(env.db, env.blobs, file_id=finished, size=10)
    service.finalise(env.db, file_id=finished, owner="alice")
    env.age(finished)
    idle_parts = env.multipart()
    env.store(service.part_key(idle_parts, 1))
    env.age(idle_parts)
    idle_stored = env.single()
    env.store(service.blob_key(idle_stored))
    service.mark_uploaded(env.db, env.blobs, file_id=idle_stored, size=10)
    env.age(idle_stored)
    active = env.multipart()
    env.store(service.part_key(active, 1))
    crashed, live = env.blobs.writer("files/crashed"), env.blobs.writer("files/live")
    crashed.write(b"half")
    live.write(b"half")
    for temp in (env.root / ".tmp").iterdir():
        os.utime(temp, (time.time() - 100, time.time() - 100))
    live.touch()

    assert service.sweep_stale_uploads(env.db, env.blobs, idle_s=60) == 2
    assert env.state(idle_parts) is None and env.state(idle_stored) is None
    assert not (env.root / "uploads" / idle_parts).exists() and not (env.root / "files" / idle_stored).exists()
    assert env.state(finished) == "ready" and (env.root / "files" / finished).exists()
    assert env.state(active) == "uploading" and (env.root / "uploads" / active).exists()
    assert len(list((env.root / ".tmp").iterdir())) == 1
    live.commit()
    assert env.blobs.exists("files/live")


def test_bytes_that_arrive_after_their_upload_went_are_not_kept(env: Env) -> None:
    """A PUT that ends after its upload was swept (or aborted) fails with a 404 and removes what it stored; one that
    ends after another request finished the upload is a 409 and leaves that request's bytes alone."""
    single = env.single()
    env.age(single)
    assert service.sweep_stale_uploads(env.db, env.blobs, idle_s=60) == 1
    env.store(service.blob_key(single))
    with pytest.raises(NotFoundError):
        service.mark_uploaded(env.db, env.blobs, file_id=single, size=10)
    assert not env.blobs.exists(service.blob_key(single))

    parts = env.multipart()
    env.age(parts)
    assert service.sweep_stale_uploads(env.db, env.blobs, idle_s=60) == 1
    env.store(service.part_key(parts, 1))
    with pytest.raises(NotFoundError):
        service.part_stored(env.db, env.blobs, file_id=parts)
    assert not (env.root / "uploads" / parts).exists()

    done = env.single()
    env.store(service.blob_key(done))
    service.mark_uploaded(env.db, env.blobs, file_id=done, size=10)
    with pytest.raises(ConflictError):
        service.mark_uploaded(env.db, env.blobs, file_id=done, size=10)
    assert env.blobs.exists(service.blob_key(done))
