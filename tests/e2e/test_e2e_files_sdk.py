"""The files API driven by the real `together` SDK 2.42 against a live server (contract sections 1, 2.5, 7.2)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import together
import together.lib.resources.files as sdk_files
from e2e_support import (
    FILE_ID_RE,
    INVALID_LINE,
    LiveServer,
    conversation,
    names_line,
    unique,
    valid_records,
    wait_processed_http,
    wait_processed_sdk,
    write_jsonl,
)
from together.lib import check_file
from together.lib.resources.files import FileAlreadyExistsError

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


def test_upload_returns_the_file_object(alice: together.Together, valid_jsonl: Path) -> None:
    before = int(time.time())
    f = alice.files.upload(file=valid_jsonl, purpose="fine-tune", check=True)

    assert FILE_ID_RE.match(f.id), f.id
    assert f.object == "file"
    assert f.bytes == valid_jsonl.stat().st_size
    assert f.filename == "train.jsonl"
    assert f.file_type == "jsonl"
    assert f.purpose == "fine-tune"
    assert isinstance(f.created_at, int)
    assert before - 5 <= f.created_at <= time.time() + 5
    assert isinstance(f.processed, bool)


def test_valid_dataset_is_checked_by_the_server(alice: together.Together, valid_jsonl: Path) -> None:
    f = alice.files.upload(file=valid_jsonl, check=True)
    done = wait_processed_sdk(alice, f.id)

    assert done.processing_status == "COMPLETED", done
    report = done.validation_report
    assert report is not None and report.valid is True, done
    assert (report.dataset_format or "").upper() == "CONVERSATION", report
    assert report.nlines == 4, report
    assert report.error is None and report.error_type is None, report
    assert report.file_id in (None, f.id), report
    # The retrieved object keeps the upload's metadata.
    assert (done.id, done.filename, done.bytes, done.file_type, done.purpose) == (
        f.id,
        "train.jsonl",
        valid_jsonl.stat().st_size,
        "jsonl",
        "fine-tune",
    )


def test_server_rejects_what_the_sdk_check_lets_through(
    alice: together.Together, alice_http: object, invalid_jsonl: Path
) -> None:
    # Premise: the SDK's own check is structural only (api-contract 2.1), so this file reaches the server.
    assert check_file(invalid_jsonl)["is_check_passed"] is True
    f = alice.files.upload(file=invalid_jsonl, check=True)
    done = wait_processed_sdk(alice, f.id)

    assert done.processing_status == "INVALID_FORMAT", done
    report = done.validation_report
    assert report is not None and report.valid is False, done
    assert report.error_type == "INVALID_FORMAT", report
    assert names_line(report.error, INVALID_LINE), report.error
    assert "role" in (report.error or "").lower(), report.error
    # The wire report also lists the errors one by one, each with its line and field.
    raw = wait_processed_http(alice_http, f.id)  # type: ignore[arg-type]
    errors = raw["validation_report"].get("errors")
    assert isinstance(errors, list) and errors, raw
    assert any(e.get("line") == INVALID_LINE and "role" in str(e.get("field", "")) for e in errors), errors
    # A rejected file is still a file of its owner: listed, downloadable, deletable.
    assert f.id in {x.id for x in alice.files.list().data}


def test_list_shows_own_files_only(
    alice: together.Together, bob: together.Together, valid_jsonl: Path, tmp_path: Path
) -> None:
    mine = alice.files.upload(file=valid_jsonl)
    theirs = bob.files.upload(file=write_jsonl(tmp_path / "bob.jsonl", valid_records(2)))

    listed = {f.id: f for f in alice.files.list().data}
    assert mine.id in listed
    assert theirs.id not in listed
    assert listed[mine.id].filename == "train.jsonl"
    assert listed[mine.id].bytes == valid_jsonl.stat().st_size
    assert mine.id not in {f.id for f in bob.files.list().data}


def test_content_round_trips_byte_exactly(alice: together.Together, tmp_path: Path) -> None:
    # Non-ASCII text and a blank line: the download must be the stored bytes, not a re-encoding.
    records = valid_records(3)
    records[1]["messages"][1]["content"] = 'Grüße, 你好, emoji 🎉, tab\t, quote " and backslash \\'
    path = write_jsonl(tmp_path / "unicode.jsonl", records)
    path.write_bytes(path.read_bytes() + b"\n")
    f = alice.files.upload(file=path)

    resp = alice.files.content(f.id)
    assert resp.read() == path.read_bytes()
    assert resp.http_response.status_code == 200


def test_delete_then_everything_is_404(alice: together.Together, server: LiveServer, valid_jsonl: Path) -> None:
    f = alice.files.upload(file=valid_jsonl)
    wait_processed_sdk(alice, f.id)
    deleted = alice.files.delete(f.id)
    assert deleted.id == f.id
    assert deleted.deleted is True

    with pytest.raises(together.NotFoundError):
        alice.files.retrieve(f.id)
    with pytest.raises(together.NotFoundError):
        alice.files.content(f.id)
    with pytest.raises(together.NotFoundError):
        alice.files.delete(f.id)
    assert f.id not in {x.id for x in alice.files.list().data}
    assert not (server.blobs / "files" / f.id).exists(), "the deleted file's bytes are still stored"

    # The same content can be uploaded again: it is a new file, not a duplicate of the deleted one.
    again = alice.files.upload(file=valid_jsonl, raise_if_already_exists=True)
    assert again.id != f.id
    assert alice.files.content(again.id).read() == valid_jsonl.read_bytes()


def test_same_content_twice_is_the_same_file(
    alice: together.Together, valid_jsonl: Path, tmp_path: Path, alice_http: object
) -> None:
    first = alice.files.upload(file=valid_jsonl)

    t0 = time.monotonic()
    again = alice.files.upload(file=valid_jsonl, raise_if_already_exists=False)
    elapsed = time.monotonic() - t0
    assert again.id == first.id
    # The 409 carries `x-should-retry: false`; otherwise the SDK retries it twice with ~3 s of back-off.
    assert elapsed < 2.5, f"duplicate upload took {elapsed:.1f} s: was the 409 retried?"

    with pytest.raises(FileAlreadyExistsError) as info:
        alice.files.upload(file=valid_jsonl, raise_if_already_exists=True)
    assert info.value.file_id == first.id

    # Same bytes under another name: still the same content.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(valid_jsonl.read_bytes())
    assert alice.files.upload(file=copy).id == first.id
    assert [x.id for x in alice.files.list().data].count(first.id) == 1


def test_multipart_upload_with_several_parts(
    alice: together.Together, server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK goes multipart above 5 GiB with 250 MiB parts (min 5 MiB). Lower the threshold to 1 MiB
    # and the target part size to 1 MiB: the 5 MiB minimum then splits an ~11 MB file into 3 parts.
    monkeypatch.setattr(sdk_files, "MULTIPART_THRESHOLD_GB", 1 / 1024)
    monkeypatch.setattr(sdk_files, "TARGET_PART_SIZE_MB", 1)
    nonce = unique()
    path = tmp_path / "big.jsonl"
    write_jsonl(path, (conversation(nonce, i, pad=450) for i in range(11_500)))
    size = path.stat().st_size
    assert 10 * MIB < size < 15 * MIB, size
    part_size, num_parts = sdk_files._calculate_parts(size)
    assert part_size == 5 * MIB and num_parts >= 3, (part_size, num_parts)

    parts_put: list[tuple[int, int]] = []
    real_put = sdk_files.MultipartUploadManager._upload_single_part

    def spy(self: object, part_info: dict[str, object], part_data: bytes) -> str:
        parts_put.append((int(part_info["PartNumber"]), len(part_data)))  # type: ignore[call-overload]
        return real_put(self, part_info, part_data)  # type: ignore[arg-type]

    monkeypatch.setattr(sdk_files.MultipartUploadManager, "_upload_single_part", spy)

    f = alice.files.upload(file=path, check=True)

    assert sorted(n for n, _ in parts_put) == list(range(1, num_parts + 1)), parts_put
    assert sum(n for _, n in parts_put) == size
    assert f.bytes == size and f.filename == "big.jsonl" and f.file_type == "jsonl"
    assert alice.files.content(f.id).read() == path.read_bytes()
    done = wait_processed_sdk(alice, f.id)
    assert done.processing_status == "COMPLETED", done.validation_report
    assert done.validation_report is not None and done.validation_report.nlines == 11_500
    assert not (server.blobs / "uploads" / f.id).exists(), "the parts were left behind after complete"

    # Multipart duplicates answer like single-part ones (409 with the file id).
    with pytest.raises(FileAlreadyExistsError) as info:
        alice.files.upload(file=path, raise_if_already_exists=True)
    assert info.value.file_id == f.id


def test_whoami(alice: together.Together, bob: together.Together, alice_http: object) -> None:
    me = alice.whoami()
    assert me.api_key_id and me.organization_id and me.project_id and me.project_slug
    assert me.organization_name and me.project_name
    other = bob.whoami()
    assert other.api_key_id != me.api_key_id
    assert other.project_id != me.project_id

    # The CLI's identity call lives outside /v1 (api-contract 7.2).
    r = alice_http.get("/v3/whoami")  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "project_api_key"
    assert body["api_key"]["id"] == me.api_key_id
    assert body["project"]["id"] == me.project_id
    assert {"id", "name"} <= set(body["organization"])


def test_a_non_ascii_file_name_round_trips(alice: together.Together, alice_http: object, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / 'données "été"; v2.jsonl', valid_records(2))
    f = alice.files.upload(file=path)
    assert f.filename == path.name
    assert alice.files.retrieve(f.id).filename == path.name
    r = alice_http.get(f"/v1/files/{f.id}/content")  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.content == path.read_bytes()
    assert "attachment" in r.headers.get("content-disposition", "")


def _parquet(path: Path, columns: dict[str, list[list[int]]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("kind", ["eval-csv", "eval-jsonl", "parquet", "calibration"])
def test_other_purposes_and_file_types(alice: together.Together, tmp_path: Path, kind: str) -> None:
    nonce = unique()
    if kind == "eval-csv":
        path, purpose, file_type = tmp_path / "eval.csv", "eval", "csv"
        path.write_text(f"prompt,answer\nwhat is 2+2 ({nonce}),4\nsay hi,hi\n")
    elif kind == "eval-jsonl":
        path, purpose, file_type = tmp_path / "eval.jsonl", "eval", "jsonl"
        write_jsonl(path, [{"prompt": f"what is 2+2 ({nonce})", "answer": "4"}])
    elif kind == "parquet":
        path, purpose, file_type = tmp_path / "tokens.parquet", "fine-tune", "parquet"
        ids = [[1, 2, 3, int(nonce[:6], 16)], [4, 5]]
        _parquet(path, {"input_ids": ids, "labels": [[-100, 2, 3, 9], [4, 5]]})
    else:
        path, purpose, file_type = tmp_path / "calib.jsonl", "calibration", "jsonl"
        write_jsonl(path, valid_records(2, nonce))

    f = alice.files.upload(file=path, purpose=purpose, check=True)
    assert (f.purpose, f.file_type) == (purpose, file_type)
    done = wait_processed_sdk(alice, f.id)
    assert done.processing_status == "COMPLETED", done.validation_report
    assert alice.files.content(f.id).read() == path.read_bytes()


def test_parquet_with_a_forbidden_column_is_invalid(alice: together.Together, tmp_path: Path) -> None:
    path = _parquet(tmp_path / "bad.parquet", {"input_ids": [[1, 2, int(unique()[:6], 16)]], "text": [[1]]})
    f = alice.files.upload(file=path, check=False)
    done = wait_processed_sdk(alice, f.id)
    assert done.processing_status == "INVALID_FORMAT", done
    assert done.validation_report is not None and "text" in (done.validation_report.error or ""), done
