"""Storage on an S3-compatible server (moto's server mode, started here): uploads go straight to the bucket.

One tuneforge server keeps its files, checkpoints and weights in a bucket (`TUNEFORGE_STORAGE_URL=s3://…`). The
real together SDK uploads through it: the upload URL it follows is the bucket's presigned PUT (or presigned part
PUTs, for a multipart upload), so the bytes reach the bucket without passing through the API server, whose access
log shows no PUT. A fine-tune on a tiny model reads its data from the bucket and writes its weights there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import together
import together.lib.resources.files as sdk_files
from e2e_support import LiveServer, conversation, unique, wait_processed_sdk, write_jsonl
from ft_support import Watch, create_job, finish_ft_server, qa_records, start_ft_server, upload_ready
from s3_support import S3Server

pytestmark = pytest.mark.timeout(240)
MIB = 1 << 20
BUCKET = "tuneforge-e2e"
# uvicorn's access log line for a PUT, and moto's (Werkzeug's) for a PUT into the bucket.
SERVER_PUT = re.compile(r'"PUT [^"]*HTTP/1\.1"')
BUCKET_PUT = re.compile(r'"PUT /' + BUCKET + r'/blobs/([^ ?"]+)(\?[^ "]*)? HTTP/1\.1" 200')


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server.start(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tf(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A fine-tuning server (tiny models in its catalog) whose storage is the bucket."""
    env = {**s3.env(), "TUNEFORGE_STORAGE_URL": s3.bucket_url(BUCKET)}
    server = start_ft_server(tmp_path_factory.mktemp("tf-s3"), env=env)
    try:
        server.create_keys(["alice", "bob"])
        yield server
    finally:
        finish_ft_server(server)


@pytest.fixture
def alice(tf: LiveServer) -> together.Together:
    return tf.client(tf.keys["alice"])


def bucket_keys(s3: S3Server, prefix: str) -> list[str]:
    """The keys under `blobs/<prefix>` in the bucket, listed over S3's own API."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, **_boto_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"blobs/{prefix}")
    return [obj["Key"][len("blobs/") :] for page in pages for obj in page.get("Contents", [])]


def open_multipart_uploads(s3: S3Server) -> list[dict[str, Any]]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, **_boto_credentials())
    return list(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def _boto_credentials() -> dict[str, str]:
    from s3_support import CREDENTIALS

    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}  # fmt: skip


def server_puts(tf: LiveServer) -> list[str]:
    return SERVER_PUT.findall(tf.log())


def test_a_single_upload_goes_straight_to_the_bucket(
    alice: together.Together, tf: LiveServer, s3: S3Server, tmp_path: Path
) -> None:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, (conversation(unique(), i, pad=200) for i in range(2000)))

    f = alice.files.upload(file=path, purpose="fine-tune", check=True)

    assert f.bytes == path.stat().st_size
    done = wait_processed_sdk(alice, f.id)
    assert done.processing_status == "COMPLETED", done.validation_report
    assert done.validation_report is not None and done.validation_report.nlines == 2000
    assert alice.files.content(f.id).read() == path.read_bytes()
    # The bytes went to the bucket's presigned URL, and never through the API server.
    landed = [m.group(1) for m in BUCKET_PUT.finditer(s3.log())]
    assert f"uploads/{f.id}/body" in landed, s3.log()[-2000:]
    assert server_puts(tf) == [], server_puts(tf)
    # Moved to the file's key inside the bucket; nothing left at the staging key.
    assert bucket_keys(s3, f"files/{f.id}") == [f"files/{f.id}"]
    assert bucket_keys(s3, f"uploads/{f.id}") == []


def test_a_multipart_upload_goes_straight_to_the_bucket(
    alice: together.Together, tf: LiveServer, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK goes multipart above 5 GiB; lowered here, with 1 MiB target parts (its 5 MiB minimum applies).
    monkeypatch.setattr(sdk_files, "MULTIPART_THRESHOLD_GB", 1 / 1024)
    monkeypatch.setattr(sdk_files, "TARGET_PART_SIZE_MB", 1)
    path = tmp_path / "big.jsonl"
    write_jsonl(path, (conversation(unique(), i, pad=450) for i in range(11_500)))
    size = path.stat().st_size
    _part_size, num_parts = sdk_files._calculate_parts(size)
    assert num_parts >= 2

    f = alice.files.upload(file=path, check=True)

    assert f.bytes == size
    assert alice.files.content(f.id).read() == path.read_bytes()
    done = wait_processed_sdk(alice, f.id)
    assert done.processing_status == "COMPLETED", done.validation_report
    # Each part went to the bucket (S3's UploadPart: partNumber and uploadId in the presigned URL).
    part_puts = [m for m in BUCKET_PUT.finditer(s3.log()) if m.group(1) == f"files/{f.id}"]
    assert len(part_puts) == num_parts and all("uploadId=" in (m.group(2) or "") for m in part_puts), s3.log()[-3000:]
    assert server_puts(tf) == []
    assert open_multipart_uploads(s3) == []


def test_bytes_that_do_not_match_the_checksum_are_refused_and_not_kept(tf: LiveServer, s3: S3Server) -> None:
    http = tf.http(tf.keys["alice"])
    data = b'{"text": "hello bucket"}\n' * 50
    form = {"purpose": "fine-tune", "file_name": "t.jsonl", "file_type": "jsonl",
            "checksum": hashlib.sha256(b"other bytes").hexdigest()}  # fmt: skip
    opened = http.post("/v1/files", files={k: (None, v) for k, v in form.items()}, follow_redirects=False)
    assert opened.status_code == 302, opened.text
    file_id, location = opened.headers["X-Together-File-Id"], opened.headers["Location"]
    assert location.startswith(s3.endpoint), location  # the bucket's own URL

    early = http.post(f"/v1/files/{file_id}/preprocess")
    assert early.status_code == 400 and "no content yet" in early.json()["error"]["message"], early.text

    assert httpx.put(location, content=data).status_code == 200
    refused = http.post(f"/v1/files/{file_id}/preprocess")
    assert refused.status_code == 400, refused.text
    assert "checksum mismatch" in refused.json()["error"]["message"]
    assert bucket_keys(s3, f"files/{file_id}") == [] and bucket_keys(s3, f"uploads/{file_id}") == []
    assert file_id not in [x["id"] for x in http.get("/v1/files").json()["data"]]


def test_an_aborted_multipart_upload_leaves_nothing_in_the_bucket(tf: LiveServer, s3: S3Server) -> None:
    http = tf.http(tf.keys["alice"])
    data = b'{"text": "part"}\n' * (6 * MIB // 17 + 1)
    body = {"file_name": "m.jsonl", "file_size": 2 * len(data), "num_parts": 2, "purpose": "fine-tune",
            "file_type": "jsonl", "checksum": hashlib.sha256(data + data).hexdigest()}  # fmt: skip
    init = http.post("/v1/files/multipart/initiate", json=body)
    assert init.status_code == 200, init.text
    first = init.json()["parts"][0]
    assert first["URL"].startswith(s3.endpoint)
    put = httpx.put(first["URL"], content=data)
    assert put.status_code == 200 and put.headers.get("ETag"), put.text
    assert len(open_multipart_uploads(s3)) == 1

    aborted = http.post("/v1/files/multipart/abort", json={"upload_id": init.json()["upload_id"],
                                                           "file_id": init.json()["file_id"]})  # fmt: skip
    assert aborted.status_code == 200, aborted.text
    assert open_multipart_uploads(s3) == []
    assert bucket_keys(s3, f"files/{init.json()['file_id']}") == []


def test_a_fine_tune_reads_and_writes_the_bucket(
    alice: together.Together, tf: LiveServer, s3: S3Server, tmp_path: Path
) -> None:
    file_id = upload_ready(alice, tmp_path / "qa.jsonl", qa_records(8, nonce=unique()))
    job = create_job(alice, file_id)

    done = Watch(alice, job.id).completed(timeout=180)

    assert done.status == "completed"
    stored = bucket_keys(s3, f"jobs/{job.id}/")
    assert any(k.startswith(f"jobs/{job.id}/final/adapter/") for k in stored), stored
    assert any(k.startswith(f"jobs/{job.id}/checkpoints/") for k in stored), stored
    assert not (tf.home / "blobs").exists(), "storage on S3 wrote blobs to the local folder"
    # The weights download through the API, streamed from the bucket.
    archive = alice.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read()
    assert archive[:2] == b"\x1f\x8b" and len(archive) > 1000
