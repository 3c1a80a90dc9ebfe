"""A server restarted on the same home keeps its keys, files, check results and open uploads;
checks cut short by a crash are finished by the next server."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2e_support import (
    INVALID_LINE,
    LiveServer,
    assert_envelope,
    assert_nothing_stored,
    conversation,
    jsonl_bytes,
    names_line,
    opened,
    put_bytes,
    unique,
    valid_records,
    wait_processed_sdk,
    wait_until,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(120)


def _moved(url: str, server: LiveServer) -> str:
    """The same upload URL on the new server's port."""
    return str(httpx.URL(url).copy_with(port=server.port))


def test_files_survive_a_restart(
    server_factory: Callable[..., LiveServer], valid_jsonl: Path, invalid_jsonl: Path
) -> None:
    first = server_factory()
    key = first.create_key("alice-restart", "alice")
    client = first.client(key, _strict_response_validation=True)
    good = client.files.upload(file=valid_jsonl)
    bad = client.files.upload(file=invalid_jsonl)
    pending_data, half_done_data = jsonl_bytes(valid_records(2)), jsonl_bytes(valid_records(3))
    with first.http(key) as http:
        pending = opened(http, data=pending_data)  # opened; bytes not sent yet
        half_done = opened(http, data=half_done_data)  # bytes sent; /preprocess not called yet
    assert put_bytes(half_done.location, half_done_data).status_code == 200
    assert wait_processed_sdk(client, good.id).processing_status == "COMPLETED"
    assert wait_processed_sdk(client, bad.id).processing_status == "INVALID_FORMAT"
    assert first.stop() in (0, -signal.SIGTERM), first.log_tail()

    second = server_factory(home=first.home)
    client = second.client(key, _strict_response_validation=True)
    listed = {f.id: f for f in client.files.list().data}
    assert good.id in listed and bad.id in listed
    assert listed[good.id].processing_status == "COMPLETED"
    assert listed[good.id].validation_report is not None and listed[good.id].validation_report.valid is True
    assert listed[bad.id].processing_status == "INVALID_FORMAT"
    assert names_line(listed[bad.id].validation_report.error, INVALID_LINE)  # type: ignore[union-attr]
    assert client.files.content(good.id).read() == valid_jsonl.read_bytes()
    # Duplicate detection still knows the old file.
    assert client.files.upload(file=valid_jsonl).id == good.id

    # An upload URL handed out before the restart still works (the signing key lives in the home),
    # and so does the /preprocess of bytes sent before it.
    assert put_bytes(_moved(pending.location, second), pending_data).status_code == 200
    with second.http(key) as http:
        for up in (pending, half_done):
            r = http.post(f"/v1/files/{up.file_id}/preprocess")
            assert r.status_code == 200, r.text
    for up, data in ((pending, pending_data), (half_done, half_done_data)):
        assert wait_processed_sdk(client, up.file_id).processing_status == "COMPLETED"
        assert client.files.content(up.file_id).read() == data


def test_a_crash_is_recovered_from(server_factory: Callable[..., LiveServer], tmp_path: Path) -> None:
    first = server_factory()
    key = first.create_key("alice-crash", "alice")
    client = first.client(key)
    # An upload whose PUT is cut off by the crash.
    data = jsonl_bytes(valid_records(5000))
    with first.http(key) as http:
        cut = opened(http, data=data)
    opened_at = time.monotonic()
    # A file big enough that its check is likely still queued or running when the server is killed.
    big = write_jsonl(tmp_path / "big.jsonl", (conversation(unique(), i, pad=200) for i in range(30_000)))
    f = client.files.upload(file=big, check=False)

    sock = socket.create_connection(("127.0.0.1", first.port))
    try:
        path = httpx.URL(cut.location).raw_path.decode()
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        sock.sendall(data[: len(data) // 2])
        tmp = first.blobs / ".tmp"
        wait_until(lambda: tmp.exists() and any(tmp.iterdir()), timeout=10, what="the PUT to start writing")
        first.stop(signal.SIGKILL)
    finally:
        sock.close()
    assert any((first.blobs / ".tmp").iterdir()), "premise: the killed server left a partial temporary file"

    # The next server treats uploads older than 1 s as abandoned.
    time.sleep(max(0.0, 1.5 - (time.monotonic() - opened_at)))
    second = server_factory(home=first.home, env={"TUNEFORGE_STALE_UPLOAD_S": "1"})
    client = second.client(key)
    done = wait_processed_sdk(client, f.id, timeout=90)
    assert done.processing_status == "COMPLETED", done.validation_report
    assert done.validation_report is not None and done.validation_report.nlines == 30_000

    # The abandoned upload is swept away, with its partial bytes.
    with second.http(key) as http:
        assert_envelope(put_bytes(_moved(cut.location, second), data), 404)
        assert_nothing_stored(second, http, cut.file_id)
