"""Direct uploads (storage on S3: the bytes go to the bucket's presigned URLs) and the sweep of idle uploads.

The server sees none of a direct upload's PUTs, so an unfinished one counts as abandoned only once its URLs have
expired (`service.direct_idle_s`), not after the idle time of uploads it receives itself; a swept direct multipart
upload is aborted in the bucket too. Runs on a real S3-compatible server (moto's, tests/s3_support.py).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from s3_support import S3Server
from sqlalchemy import update

from tuneforge.api.files import service
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore, open_blob_store
from tuneforge.store import Database, open_database
from tuneforge.store.tables import FileRow

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server.start(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in server.env().items():
                mp.setenv(name, value)
            yield server
    finally:
        server.stop()


@pytest.fixture
def env(s3: S3Server, tmp_path: Path) -> Iterator[tuple[Settings, Database, BlobStore]]:
    settings = Settings(home=tmp_path / "home", storage_url=s3.bucket_url("sweep", uuid.uuid4().hex),
                        stale_upload_s=60, upload_url_ttl_s=3600)  # fmt: skip
    settings.ensure_home()
    db = open_database(settings.database_url)
    try:
        yield settings, db, open_blob_store(settings.storage_url)
    finally:
        db.close()


def _age(db: Database, file_id: str, seconds: float) -> None:
    with db.session() as s:
        s.execute(update(FileRow).where(FileRow.id == file_id).values(updated_at=time.time() - seconds))


def _multipart_uploads(blobs: BlobStore) -> list[str]:
    bucket = blobs.url.removeprefix("s3://").split("/")[0]
    listing = blobs.fs.call_s3("list_multipart_uploads", Bucket=bucket)  # type: ignore[attr-defined]
    return [u["Key"] for u in listing.get("Uploads", [])]


def test_a_direct_upload_is_swept_only_once_its_urls_have_expired(env: tuple[Settings, Database, BlobStore]) -> None:
    settings, db, blobs = env
    direct = service.direct_store(blobs, settings)
    assert direct is not None
    data = b"x" * (5 * MIB + 10)
    row = service.open_multipart_upload(
        db, settings, owner="alice", purpose="fine-tune", file_name="a.jsonl", file_type="jsonl",
        checksum=hashlib.sha256(data).hexdigest(), file_size=len(data), num_parts=2, direct=direct,
    )  # fmt: skip
    assert row.upload_kind == "direct-multipart" and row.storage_upload_id
    url = direct.part_url(service.blob_key(row.id), row.storage_upload_id, 1, 60)
    assert httpx.put(url, content=data[: 5 * MIB]).status_code == 200
    assert len(_multipart_uploads(blobs)) == 1

    # Idle longer than stale_upload_s, but its URLs may still be in use: kept.
    _age(db, row.id, 120)
    idle, ttl_idle = settings.stale_upload_s, service.direct_idle_s(settings)
    assert ttl_idle == 3600
    assert service.sweep_stale_uploads(db, blobs, idle_s=idle, direct_idle_s=ttl_idle) == 0
    # Past the URLs' lifetime: the row goes, and the bucket's multipart upload with its part.
    _age(db, row.id, 4000)
    assert service.sweep_stale_uploads(db, blobs, idle_s=idle, direct_idle_s=ttl_idle) == 1
    with db.session() as s:
        assert s.get(FileRow, row.id) is None
    assert _multipart_uploads(blobs) == []


def test_a_direct_single_put_left_unfinished_is_swept_with_its_staged_bytes(
    env: tuple[Settings, Database, BlobStore],
) -> None:
    settings, db, blobs = env
    direct = service.direct_store(blobs, settings)
    assert direct is not None
    row = service.open_single_upload(db, settings, owner="alice", purpose="fine-tune", file_name="a.jsonl",
                                     file_type="jsonl", checksum=hashlib.sha256(b"{}").hexdigest(),
                                     direct=True)  # fmt: skip
    assert httpx.put(direct.put_url(service.staging_key(row.id), 60), content=b"{}").status_code == 200
    assert blobs.exists(service.staging_key(row.id))
    _age(db, row.id, 4000)
    assert service.sweep_stale_uploads(db, blobs, idle_s=60, direct_idle_s=3600) == 1
    assert not blobs.exists(service.staging_key(row.id))


def test_without_direct_uploads_the_server_receives_the_bytes(env: tuple[Settings, Database, BlobStore]) -> None:
    settings, _db, blobs = env
    assert blobs.direct is not None
    assert service.direct_store(blobs, settings.model_copy(update={"direct_uploads": False})) is None
