"""Bad input against a live server, with raw HTTP: each is a clear 4xx in the error envelope, nothing
half-stored is left behind (no blob, no temporary file, nothing listed), and the server keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import together
from e2e_support import (
    MAX_FILE_BYTES_SMALL,
    MAX_LINE_BYTES_SMALL,
    LiveServer,
    assert_envelope,
    assert_nothing_stored,
    form,
    jsonl_bytes,
    listed_ids,
    names_line,
    opened,
    put_bytes,
    raw_exchange,
    sha256_hex,
    unique,
    upload_raw,
    valid_records,
    wait_processed_http,
    wait_processed_sdk,
    wait_until,
)
from together.lib.types.error import FileTypeError

from tuneforge.api.files.signing import signed_query

pytestmark = pytest.mark.timeout(60)


def dataset() -> bytes:
    """A small valid dataset, unique per call."""
    return jsonl_bytes(valid_records(2))


# --- POST /v1/files: the form that opens an upload ----------------------------------------------------

# name: (Content-Type, body, what the error message must mention)
GARBAGE_FORMS = {
    "garbage-body": ("multipart/form-data; boundary=xyz", b"\x00\xffthis is not multipart at all\r\n", "multipart"),
    "no-boundary": (
        "multipart/form-data",
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nx\r\n--b--\r\n',
        "boundary",
    ),
    "unterminated": (
        "multipart/form-data; boundary=xyz",
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune',
        "purpose",
    ),
    "bad-part-header": (
        "multipart/form-data; boundary=xyz",
        b"--xyz\r\nNo-Colon-Here\r\n\r\nvalue\r\n--xyz--\r\n",
        "multipart",
    ),
    "json-instead": ("application/json", b'{"purpose": "fine-tune", "file_name": "a.jsonl"}', "checksum"),
    "empty": ("multipart/form-data; boundary=xyz", b"", "purpose"),
}


@pytest.mark.parametrize("case", GARBAGE_FORMS, ids=list(GARBAGE_FORMS))
def test_malformed_upload_form(server: LiveServer, alice_http: httpx.Client, case: str) -> None:
    content_type, body, fragment = GARBAGE_FORMS[case]
    before = listed_ids(alice_http)
    r = alice_http.post("/v1/files", content=body, headers={"Content-Type": content_type}, follow_redirects=False)
    assert_envelope(r, 400, fragment)
    assert listed_ids(alice_http) == before
    assert_nothing_stored(server, alice_http, None)


@pytest.mark.parametrize("missing", ["purpose", "file_name", "file_type", "checksum"])
def test_upload_form_missing_a_field(server: LiveServer, alice_http: httpx.Client, missing: str) -> None:
    fields = {"purpose": "fine-tune", "file_name": "a.jsonl", "file_type": "jsonl", "checksum": sha256_hex(b"x")}
    del fields[missing]
    r = alice_http.post("/v1/files", files=form(**fields), follow_redirects=False)
    assert_envelope(r, 400, missing)
    assert_nothing_stored(server, alice_http, None)


BAD_FIELDS = {
    "unknown-purpose": ({"purpose": "fine_tune"}, ["purpose", "fine_tune"]),
    "empty-purpose": ({"purpose": ""}, ["purpose"]),
    "unknown-file-type": ({"file_type": "txt", "file_name": "a.txt"}, ["file_type", "txt"]),
    "slash-in-name": ({"file_name": "dir/train.jsonl"}, ["file_name"]),
    "backslash-in-name": ({"file_name": "dir\\train.jsonl"}, ["file_name"]),
    "dotdot-name": ({"file_name": "../train.jsonl"}, ["file_name"]),
    "empty-name": ({"file_name": ""}, ["file_name"]),
    "nul-in-name": ({"file_name": "a\x00.jsonl"}, ["file_name"]),
    "name-type-mismatch": ({"file_name": "train.parquet"}, ["file_name", ".jsonl"]),
    "csv-for-fine-tune": ({"file_type": "csv", "file_name": "a.csv"}, ["csv"]),
    "short-checksum": ({"checksum": "abc123"}, ["checksum"]),
    "non-hex-checksum": ({"checksum": "z" * 64}, ["checksum"]),
}


@pytest.mark.parametrize("case", BAD_FIELDS, ids=list(BAD_FIELDS))
def test_upload_form_with_a_bad_value(server: LiveServer, alice_http: httpx.Client, case: str) -> None:
    overrides, fragments = BAD_FIELDS[case]
    fields = {"purpose": "fine-tune", "file_name": "a.jsonl", "file_type": "jsonl", "checksum": sha256_hex(b"x")}
    fields |= overrides
    before = listed_ids(alice_http)
    r = alice_http.post("/v1/files", files=form(**fields), follow_redirects=False)
    assert_envelope(r, 400, *fragments)
    assert "location" not in r.headers
    assert listed_ids(alice_http) == before
    assert_nothing_stored(server, alice_http, None)


def test_every_problem_is_named_at_once(alice_http: httpx.Client) -> None:
    fields = {"purpose": "nope", "file_name": "a/b.jsonl", "file_type": "txt", "checksum": "abc"}
    r = alice_http.post("/v1/files", files=form(**fields), follow_redirects=False)
    assert_envelope(r, 400, "purpose", "file_name", "file_type", "checksum")


# --- PUT <upload URL>: the bytes ----------------------------------------------------------------------


def test_put_with_the_wrong_checksum(server: LiveServer, alice_http: httpx.Client) -> None:
    declared = dataset()
    up = opened(alice_http, data=declared)
    r = put_bytes(up.location, dataset())
    assert_envelope(r, 400, "checksum")
    assert_nothing_stored(server, alice_http, up.file_id)

    # Nothing was spoiled: the same URL still takes the declared bytes.
    assert put_bytes(up.location, declared).status_code == 200
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert alice_http.get(f"/v1/files/{up.file_id}/content").content == declared


@pytest.mark.parametrize("how", ["close", "reset"])
def test_truncated_put(server: LiveServer, alice_http: httpx.Client, how: str) -> None:
    data = jsonl_bytes(valid_records(2000))  # a few hundred KB
    up = opened(alice_http, data=data)
    head = f"PUT {up.path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: {len(data)}\r\n\r\n"
    raw_exchange(server.port, head, [data[: len(data) // 2]], close_after_send=how)
    assert_nothing_stored(server, alice_http, up.file_id)

    # The client can simply try again.
    r = put_bytes(up.location, data)
    assert r.status_code == 200, r.text
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert alice_http.get(f"/v1/files/{up.file_id}/content").content == data


def test_empty_put(server: LiveServer, alice_http: httpx.Client) -> None:
    up = opened(alice_http, data=b"")
    r = put_bytes(up.location, b"")
    assert_envelope(r, 400, "empty")
    assert_nothing_stored(server, alice_http, up.file_id)


def test_sdk_upload_of_an_empty_file(server: LiveServer, alice: together.Together, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(together.APIStatusError) as info:
        alice.files.upload(file=path, check=False)
    assert "empty" in str(info.value).lower()
    server.assert_serving()


def test_concurrent_puts_of_one_upload(server: LiveServer, alice_http: httpx.Client) -> None:
    data = jsonl_bytes(valid_records(5000))
    up = opened(alice_http, data=data)
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda _: put_bytes(up.location, data).status_code, range(4)))
    assert statuses == [200, 409, 409, 409], statuses
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert alice_http.get(f"/v1/files/{up.file_id}/content").content == data
    assert not list((server.blobs / ".tmp").iterdir())


def test_second_put_after_success(server: LiveServer, alice_http: httpx.Client) -> None:
    data = dataset()
    up = opened(alice_http, data=data)
    assert put_bytes(up.location, data).status_code == 200
    assert_envelope(put_bytes(up.location, data), 409, "already")
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert_envelope(put_bytes(up.location, data), 409, "already")
    assert alice_http.get(f"/v1/files/{up.file_id}/content").content == data
    assert not list((server.blobs / ".tmp").iterdir())


def _sign(server: LiveServer, file_id: str, ttl_s: int, key_id: str) -> str:
    secret = (server.home / "upload_secret").read_text().strip().encode()
    return f"{server.base}/uploads/{file_id}?{signed_query(secret, file_id, 0, ttl_s, key_id=key_id)}"


def test_put_with_a_bad_or_expired_signature(server: LiveServer, alice_http: httpx.Client) -> None:
    data = dataset()
    up = opened(alice_http, data=data)
    url = httpx.URL(up.location)
    sig = url.params["sig"]
    tampered = url.copy_set_param("sig", ("0" if sig[0] != "0" else "1") + sig[1:])
    assert_envelope(httpx.put(tampered, content=data), 403, "signature")
    later = url.copy_set_param("expires", str(int(url.params["expires"]) + 3600))
    assert_envelope(httpx.put(later, content=data), 403, "signature")
    assert_envelope(httpx.put(_sign(server, up.file_id, -60, url.params["kid"]), content=data), 403, "expired")
    assert_envelope(httpx.put(url.copy_remove_param("sig"), content=data), 400, "sig")
    # A signature that is not even hex (non-ASCII, too long) is a wrong signature too: 403, never a 500.
    tracebacks = server.log().count("Traceback")
    for odd in ("é" * 64, "\u00ff", sig + "0", sig.upper(), " " + sig[1:]):
        assert_envelope(httpx.put(url.copy_set_param("sig", odd), content=data), 403, "signature")
    assert server.log().count("Traceback") == tracebacks  # a client's mistake costs no traceback in the log
    assert_envelope(httpx.put(url.copy_set_param("kid", "key-of-someone-else"), content=data), 403, "signature")
    assert_envelope(httpx.put(url.copy_set_param("expires", "soon"), content=data), 400, "expires")
    assert_nothing_stored(server, alice_http, up.file_id)

    assert put_bytes(up.location, data).status_code == 200


def test_revoking_a_key_ends_the_signed_urls_it_made(server: LiveServer) -> None:
    name = f"short-lived-{unique()}"
    key = server.create_key(name, "alice")
    with server.http(key) as http:
        data = dataset()
        up = opened(http, data=data)
    server.revoke_key(name)
    assert_envelope(httpx.put(up.location, content=data), 403, "revoked")
    with server.http(server.create_key(f"alice-again-{unique()}", "alice")) as http:
        assert up.file_id not in listed_ids(http)


def test_put_for_a_deleted_or_unknown_file(server: LiveServer, alice_http: httpx.Client) -> None:
    data = dataset()
    up = opened(alice_http, data=data)
    assert put_bytes(up.location, data).status_code == 200
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert alice_http.delete(f"/v1/files/{up.file_id}").status_code == 200
    assert_envelope(put_bytes(up.location, data), 404)
    assert not (server.blobs / "files" / up.file_id).exists()

    # A correctly signed URL for a file id the server never issued.
    ghost = "file-00000000-0000-4000-8000-" + unique()[:12]
    kid = httpx.URL(up.location).params["kid"]
    assert_envelope(put_bytes(_sign(server, ghost, 60, kid), data), 404)
    assert not (server.blobs / "files" / ghost).exists()
    assert_nothing_stored(server, alice_http, None)


def test_put_of_another_files_url(server: LiveServer, alice_http: httpx.Client) -> None:
    a = opened(alice_http, data=dataset())
    b = opened(alice_http, data=dataset())
    forged = httpx.URL(b.location).copy_with(path=f"/uploads/{a.file_id}")
    assert_envelope(httpx.put(forged, content=b"x"), 403, "signature")
    assert_nothing_stored(server, alice_http, a.file_id)


# --- POST /v1/files/{id}/preprocess --------------------------------------------------------------------


def test_preprocess_before_the_put(server: LiveServer, alice_http: httpx.Client) -> None:
    data = dataset()
    up = opened(alice_http, data=data)
    assert_envelope(alice_http.post(f"/v1/files/{up.file_id}/preprocess"), 400, "PUT")
    assert up.file_id not in listed_ids(alice_http)
    # It was only too early: the upload still completes.
    assert put_bytes(up.location, data).status_code == 200
    assert alice_http.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
    assert up.file_id in listed_ids(alice_http)


def test_preprocess_of_a_deleted_or_unknown_file(alice_http: httpx.Client) -> None:
    file_id = upload_raw(alice_http, dataset())
    assert alice_http.delete(f"/v1/files/{file_id}").status_code == 200
    assert_envelope(alice_http.post(f"/v1/files/{file_id}/preprocess"), 404, file_id)
    assert_envelope(alice_http.post("/v1/files/file-does-not-exist/preprocess"), 404)


def test_preprocess_twice_is_harmless(alice_http: httpx.Client) -> None:
    file_id = upload_raw(alice_http, dataset())
    again = alice_http.post(f"/v1/files/{file_id}/preprocess")
    assert again.status_code == 200 and again.json()["id"] == file_id
    assert wait_processed_http(alice_http, file_id)["processing_status"] == "COMPLETED"


# --- datasets the server must reject after the upload ---------------------------------------------------


@pytest.fixture
def carol(server: LiveServer, carol_key: str) -> together.Together:
    return server.client(carol_key)


@pytest.fixture
def carol_http(server: LiveServer, carol_key: str) -> httpx.Client:
    with server.http(carol_key) as http:
        yield http  # type: ignore[misc]


def assert_strictly_valid(server: LiveServer, key: str, file_id: str) -> None:
    """Whatever the verdict, the file object still parses under the SDK's strict validation."""
    server.client(key, _strict_response_validation=True).files.retrieve(file_id)


def test_a_file_whose_check_broke_still_parses(server: LiveServer, carol_http: httpx.Client, carol_key: str) -> None:
    # Nesting deep enough to trip a recursive JSON decoder. Whatever the server makes of it (it should be
    # INVALID_FORMAT), the file object must keep to the contract: `validation_report.error_type` is
    # "INVALID_FORMAT" or absent (api-contract 1.2). Anything else breaks strict clients, and breaks the
    # owner's whole `files.list()` for them.
    file_id = upload_raw(carol_http, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    done = wait_processed_http(carol_http, file_id)
    assert done["processing_status"] in ("COMPLETED", "INVALID_FORMAT", "FAILED"), done
    error_type = (done["validation_report"] or {}).get("error_type")
    assert error_type in (None, "INVALID_FORMAT"), done["validation_report"]
    assert_strictly_valid(server, carol_key, file_id)
    server.client(carol_key, _strict_response_validation=True).files.list()


def test_non_utf8_jsonl(server: LiveServer, carol: together.Together, carol_key: str, tmp_path: Path) -> None:
    lines = jsonl_bytes(valid_records(3)).splitlines(keepends=True)
    lines[1] = lines[1].replace(b"Question", b"Qu\xe9stion\xff")  # latin-1 bytes: not UTF-8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    # The SDK's local check catches it; a client that skips the check reaches the server's own.
    with pytest.raises(FileTypeError):
        carol.files.upload(file=path, check=True)
    f = carol.files.upload(file=path, check=False)
    done = wait_processed_sdk(carol, f.id)
    assert done.processing_status == "INVALID_FORMAT", done.validation_report
    assert done.validation_report is not None and done.validation_report.valid is False
    assert done.validation_report.error_type == "INVALID_FORMAT"
    assert names_line(done.validation_report.error, 2), done.validation_report.error
    assert_strictly_valid(server, carol_key, f.id)


GOOD_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (GOOD_LINE + b"[1, 2]\n", 2),
        (GOOD_LINE + b'{"messages": [\n', 2),
        (GOOD_LINE + b"\n\n" + GOOD_LINE.replace(b'"yo"', b'"again"') + b"not json\n", 5),
        (b"\n\n   \n", None),
        (GOOD_LINE + b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 2),
    ],
    ids=["array-line", "broken-json", "after-blank-lines", "only-blank-lines", "deeply-nested"],
)
def test_structurally_broken_jsonl_is_invalid(
    server: LiveServer, carol_http: httpx.Client, carol_key: str, content: bytes, line: int | None
) -> None:
    content = content.replace(b'"hi"', json.dumps(unique()).encode())
    file_id = upload_raw(carol_http, content)
    done = wait_processed_http(carol_http, file_id)
    assert done["processing_status"] == "INVALID_FORMAT", done
    report = done["validation_report"]
    assert report["valid"] is False and report["error_type"] == "INVALID_FORMAT", report
    if line is not None:
        assert names_line(report["error"], line), report
    assert_strictly_valid(server, carol_key, file_id)


@pytest.mark.timeout(240)
def test_a_100_mb_single_line(server: LiveServer, carol: together.Together, tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    block = b"a" * (1 << 20)
    with path.open("wb") as fh:
        fh.write(b'{"messages": [{"role": "user", "content": "' + unique().encode())
        for _ in range(100):
            fh.write(block)
        fh.write(b'"}, {"role": "assistant", "content": "ok"}]}\n')
    size = path.stat().st_size

    f = carol.files.upload(file=path, check=False)
    assert f.bytes == size
    # While the server checks the file, it keeps answering.
    deadline = time.monotonic() + 180
    slowest = 0.0
    while True:
        t0 = time.monotonic()
        server.assert_serving()
        slowest = max(slowest, time.monotonic() - t0)
        current = carol.files.retrieve(f.id)
        if current.processing_status not in (None, "PENDING", "QUEUED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"processing of a 100 MB line did not finish: {current}"
        time.sleep(0.25)
    assert slowest < 5, f"/health took {slowest:.1f} s while the big file was being checked"
    assert current.processing_status in ("COMPLETED", "INVALID_FORMAT"), current
    if current.processing_status == "INVALID_FORMAT":
        assert current.validation_report is not None
        assert names_line(current.validation_report.error, 1), current.validation_report
    assert carol.files.retrieve(f.id).bytes == size
    assert not list((server.blobs / ".tmp").iterdir())


# --- limits (a server started with TUNEFORGE_MAX_FILE_BYTES=1 MB, TUNEFORGE_MAX_LINE_BYTES=64 KiB) ---------


@pytest.fixture
def small_http(small_server: LiveServer) -> httpx.Client:
    with small_server.http(small_server.keys["alice"]) as http:
        yield http  # type: ignore[misc]


def test_oversized_put_with_content_length(small_server: LiveServer, small_http: httpx.Client) -> None:
    size = MAX_FILE_BYTES_SMALL + 1
    up = opened(small_http, checksum=sha256_hex(b"a" * size))
    head = f"PUT {up.path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{small_server.port}\r\nContent-Length: {size}\r\n\r\n"
    # The limit is enforced on the declared length, before a byte of the body is read.
    result = raw_exchange(small_server.port, head)
    assert result is not None
    status, headers, body = result
    assert status == 413, (status, body)
    assert "json" in headers.get("content-type", "")
    err = json.loads(body)["error"]
    assert "limit" in err["message"].lower() and str(MAX_FILE_BYTES_SMALL) in err["message"], err
    assert_nothing_stored(small_server, small_http, up.file_id)


def test_oversized_put_without_content_length(small_server: LiveServer, small_http: httpx.Client) -> None:
    chunk = b"a" * 65536
    up = opened(small_http, checksum=sha256_hex(b"irrelevant"))
    head = (
        f"PUT {up.path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{small_server.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    n_chunks = MAX_FILE_BYTES_SMALL // len(chunk) + 2
    framed = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(n_chunks)]
    result = raw_exchange(small_server.port, head, framed)
    assert result is not None
    status, _, body = result
    assert status == 413, (status, body)
    assert "limit" in json.loads(body)["error"]["message"].lower()
    assert_nothing_stored(small_server, small_http, up.file_id)


def test_sdk_upload_over_the_limit(small_server: LiveServer, tmp_path: Path) -> None:
    client = small_server.client(small_server.keys["alice"], max_retries=0)
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl_bytes(valid_records(int(MAX_FILE_BYTES_SMALL * 1.2) // 250)))
    assert path.stat().st_size > MAX_FILE_BYTES_SMALL
    with pytest.raises(together.APIStatusError) as info:
        client.files.upload(file=path, check=False)
    assert info.value.status_code == 413 and "limit" in str(info.value).lower(), info.value
    small_server.assert_serving()


def test_multipart_initiate_over_the_limit(small_http: httpx.Client) -> None:
    body = {
        "file_name": "big.jsonl",
        "file_size": MAX_FILE_BYTES_SMALL + 1,
        "num_parts": 1,
        "purpose": "fine-tune",
        "file_type": "jsonl",
        "checksum": sha256_hex(b"x"),
    }
    assert_envelope(small_http.post("/v1/files/multipart/initiate", json=body), 413, "file_size")


def test_a_line_over_the_line_limit(small_http: httpx.Client) -> None:
    records = valid_records(3)
    records[1]["messages"][1]["content"] = "b" * (MAX_LINE_BYTES_SMALL + 10)
    file_id = upload_raw(small_http, jsonl_bytes(records))
    done = wait_processed_http(small_http, file_id)
    assert done["processing_status"] == "INVALID_FORMAT", done
    assert names_line(done["validation_report"]["error"], 2), done["validation_report"]


# --- multipart protocol errors --------------------------------------------------------------------------


def _initiate(http: httpx.Client, data: bytes, num_parts: int, **overrides: object) -> dict[str, object]:
    body = {
        "file_name": "mp.jsonl",
        "file_size": len(data),
        "num_parts": num_parts,
        "purpose": "fine-tune",
        "file_type": "jsonl",
        "checksum": sha256_hex(data),
    } | overrides
    r = http.post("/v1/files/multipart/initiate", json=body)
    assert r.status_code == 200, r.text
    info = r.json()
    assert len(info["parts"]) == num_parts
    return dict(info)


def _put_parts(info: dict[str, object], pieces: list[bytes]) -> list[dict[str, object]]:
    done = []
    for part, piece in zip(info["parts"], pieces, strict=True):  # type: ignore[call-overload]
        r = httpx.put(part["URL"], content=piece, headers=part.get("Headers") or {})
        assert r.status_code == 200 and r.headers.get("etag"), r.text
        done.append({"part_number": part["PartNumber"], "etag": r.headers["etag"].strip('"')})
    return done


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"purpose": "training"}, "purpose"),
        ({"file_name": "a/b.jsonl"}, "file_name"),
        ({"file_size": 0}, "file_size"),
        ({"num_parts": 0}, "num_parts"),
        ({"checksum": "nope"}, "checksum"),
        ({"file_size": "big"}, "file_size"),
    ],
    ids=["purpose", "file_name", "zero-size", "zero-parts", "checksum", "size-not-int"],
)
def test_multipart_initiate_with_bad_fields(
    server: LiveServer, alice_http: httpx.Client, overrides: dict[str, object], fragment: str
) -> None:
    body = {
        "file_name": "mp.jsonl",
        "file_size": 10,
        "num_parts": 1,
        "purpose": "fine-tune",
        "file_type": "jsonl",
        "checksum": sha256_hex(b"x"),
    } | overrides
    assert_envelope(alice_http.post("/v1/files/multipart/initiate", json=body), 400, fragment)
    assert_nothing_stored(server, alice_http, None)


def test_multipart_complete_with_a_wrong_etag_then_abort(server: LiveServer, alice_http: httpx.Client) -> None:
    data = jsonl_bytes(valid_records(50))
    half = len(data) // 2
    info = _initiate(alice_http, data, 2)
    file_id, upload_id = str(info["file_id"]), str(info["upload_id"])
    parts = _put_parts(info, [data[:half], data[half:]])

    bad = [dict(parts[0]), dict(parts[1], etag=hashlib.md5(b"other").hexdigest())]
    r = alice_http.post("/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": bad})
    assert_envelope(r, 400, "etag")
    assert not (server.blobs / "files" / file_id).exists()
    assert file_id not in listed_ids(alice_http)

    r = alice_http.post("/v1/files/multipart/abort", json={"upload_id": upload_id, "file_id": file_id})
    assert r.status_code == 200, r.text
    assert_nothing_stored(server, alice_http, file_id)
    r = alice_http.post("/v1/files/multipart/abort", json={"upload_id": upload_id, "file_id": file_id})
    assert_envelope(r, 404, upload_id)  # gone: a second abort finds nothing
    r = alice_http.post(
        "/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": parts}
    )
    assert_envelope(r, 404)


def test_multipart_complete_with_missing_or_short_parts(server: LiveServer, alice_http: httpx.Client) -> None:
    data = jsonl_bytes(valid_records(50))
    half = len(data) // 2
    info = _initiate(alice_http, data, 2)
    file_id, upload_id = str(info["file_id"]), str(info["upload_id"])
    first = _put_parts({"parts": info["parts"][:1]}, [data[:half]])  # type: ignore[index]

    r = alice_http.post(
        "/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": first}
    )
    assert_envelope(r, 400, "part")
    fake_second = [*first, {"part_number": 2, "etag": hashlib.md5(data[half:]).hexdigest()}]
    r = alice_http.post(
        "/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": fake_second}
    )
    assert_envelope(r, 400, "part 2")

    # Part 2 with a byte missing: the total no longer matches file_size.
    second = _put_parts({"parts": info["parts"][1:]}, [data[half:-1]])  # type: ignore[index]
    r = alice_http.post(
        "/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": first + second}
    )
    assert_envelope(r, 400)
    assert not (server.blobs / "files" / file_id).exists()
    assert file_id not in listed_ids(alice_http)

    # Re-sending part 2 whole fixes it.
    second = _put_parts({"parts": info["parts"][1:]}, [data[half:]])  # type: ignore[index]
    r = alice_http.post(
        "/v1/files/multipart/complete", json={"upload_id": upload_id, "file_id": file_id, "parts": first + second}
    )
    assert r.status_code == 200, r.text
    assert alice_http.get(f"/v1/files/{file_id}/content").content == data


def test_part_number_out_of_range(alice_http: httpx.Client) -> None:
    data = dataset()
    info = _initiate(alice_http, data, 1)
    url = httpx.URL(info["parts"][0]["URL"])  # type: ignore[index]
    wrong = url.copy_with(path=url.path.rsplit("/", 1)[0] + "/2")
    # The signature covers the part number, so another number is refused outright.
    assert_envelope(httpx.put(wrong, content=data), 403)


# --- routing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("GET", "/nope", 404),
        ("GET", "/v2/files", 404),
        ("PATCH", "/v1/files", 405),
        ("PUT", "/v1/files/file-x", 405),
    ],
)
def test_unknown_routes(server: LiveServer, alice_http: httpx.Client, method: str, path: str, status: int) -> None:
    body = assert_envelope(alice_http.request(method, path), status)
    if status == 404:
        assert path in body["error"]["message"]
    server.assert_serving()


# --- oversized bodies -----------------------------------------------------------------------------------------------

BIG = 200 * 2**20  # a 200 MB JSON body


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _raw_post(server: LiveServer, key: str, path: str, *, chunked: bool) -> tuple[int, bytes, int]:
    """POST a 200 MB JSON body over a raw socket, the way a hostile client would (declared, or chunked without a
    length), reading the answer as soon as one comes. Returns (status, body, bytes sent before the answer)."""
    import select
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode())
    block = b'{"pad": "' + b"x" * (2**20 - 11) + b'",'
    sent, answer = 0, b""
    try:
        while sent < BIG:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered: stop sending
            data = (f"{len(block):x}\r\n".encode() + block + b"\r\n") if chunked else block
            sock.sendall(data)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection after its answer
    sock.settimeout(30)
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 10:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1], sent


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_200_mb_json_body_gets_413_before_it_is_read(server: LiveServer, alice_key: str, chunked: bool) -> None:
    before = _rss_mb(server.proc.pid)
    started = time.monotonic()
    status, body, sent = _raw_post(server, alice_key, "/v1/fine-tunes", chunked=chunked)
    took = time.monotonic() - started
    assert status == 413, body[:300]
    error = json.loads(body)["error"]
    assert error["type"] == "request_too_large" and "at most" in error["message"]
    grew = _rss_mb(server.proc.pid) - before
    print(
        f"{'chunked' if chunked else 'declared'}: 413 after {sent / 2**20:.0f} MiB sent, {took:.2f} s, "
        f"server memory +{grew:.1f} MB"
    )
    assert grew < 50, f"the server's memory grew {grew:.0f} MB"
    assert sent < 64 * 2**20  # it answered long before the whole body could arrive
    server.assert_serving()


# --- unfinished uploads: a per-owner limit on their bytes, and a sweep of idle ones while the server runs ------------

PENDING_MAX = 1_500_000  # TUNEFORGE_MAX_PENDING_UPLOAD_BYTES of the bounded server (its file limit: 1 MB)
IDLE_S = 2  # TUNEFORGE_STALE_UPLOAD_S of the sweeping servers


def _bytes_of(n: int) -> bytes:
    """n bytes of a JSONL file unique to the call (no test here reads what the server's check makes of it)."""
    line = (json.dumps({"text": unique()}) + "\n").encode()
    return (line * (n // len(line) + 1))[:n]


def _pieces(data: bytes, n: int = 4, pause: float = 0.0) -> Iterator[bytes]:
    """`data` in `n` pieces, `pause` seconds before each: httpx sends it chunked, without a Content-Length."""
    step = -(-len(data) // n)
    for i in range(0, len(data), step):
        time.sleep(pause)
        yield data[i : i + step]


def _mp_body(size: int, **overrides: object) -> dict[str, object]:
    return {"file_name": "mp.jsonl", "file_size": size, "num_parts": 1, "purpose": "fine-tune",
            "file_type": "jsonl", "checksum": sha256_hex(unique().encode())} | overrides  # fmt: skip


def test_an_owner_over_the_pending_upload_limit_is_refused(server_factory: Callable[..., LiveServer]) -> None:
    srv = server_factory(env={"TUNEFORGE_MAX_FILE_BYTES": str(MAX_FILE_BYTES_SMALL),
                              "TUNEFORGE_MAX_PENDING_UPLOAD_BYTES": str(PENDING_MAX)})  # fmt: skip
    srv.create_keys(["alice", "bob"])
    with srv.http(srv.keys["alice"]) as alice, srv.http(srv.keys["bob"]) as bob:
        # A multipart upload reserves its file_size at initiate: 1 MB of alice's 1.5 MB.
        big = _bytes_of(MAX_FILE_BYTES_SMALL)
        info = _initiate(alice, big, 1)
        r = alice.post("/v1/files/multipart/initiate", json=_mp_body(600_000))
        assert_envelope(r, 413, "file_size", f"limit of {PENDING_MAX}", f"{MAX_FILE_BYTES_SMALL} bytes are in use",
                        "finishing or aborting")  # fmt: skip
        # A single PUT may take only what is left (500 kB): refused on its declared length, or as its bytes arrive.
        data = _bytes_of(600_000)
        up = opened(alice, data=data)
        assert_envelope(put_bytes(up.location, data), 413, f"limit of {PENDING_MAX}", "leaving 500000")
        assert_nothing_stored(srv, alice, up.file_id)
        assert_envelope(put_bytes(up.location, _pieces(data)), 413, f"limit of {PENDING_MAX}")
        assert_nothing_stored(srv, alice, up.file_id)

        # Another owner is unaffected.
        assert _initiate(bob, big, 1)["file_id"]
        upload_raw(bob, _bytes_of(400_000))

        # Aborting frees the reservation: the same PUT now fits.
        r = alice.post("/v1/files/multipart/abort", json={"upload_id": info["upload_id"], "file_id": info["file_id"]})
        assert r.status_code == 200, r.text
        assert put_bytes(up.location, _pieces(data)).status_code == 200
        # Stored but not finished, its bytes still count (600 kB held); /preprocess finishes it and frees them.
        r = alice.post("/v1/files/multipart/initiate", json=_mp_body(MAX_FILE_BYTES_SMALL))
        assert_envelope(r, 413, "600000 bytes are in use")
        assert alice.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
        assert _initiate(alice, big, 1)["file_id"]
        srv.assert_serving()


def test_idle_uploads_are_swept_while_the_server_runs(server_factory: Callable[..., LiveServer]) -> None:
    srv = server_factory(env={"TUNEFORGE_STALE_UPLOAD_S": str(IDLE_S)})
    srv.create_keys(["alice"])
    with srv.http(srv.keys["alice"]) as alice:
        finished = dataset()
        finished_id = upload_raw(alice, finished)
        wait_processed_http(alice, finished_id)

        # Left unfinished, in quick succession: a multipart upload with one part stored, a single upload whose bytes
        # are stored but never finished with /preprocess, and the temporary file a PUT cut short by a crash leaves.
        data = jsonl_bytes(valid_records(50))
        half = len(data) // 2
        info = _initiate(alice, data, 2)
        file_id, upload_id = str(info["file_id"]), str(info["upload_id"])
        parts = _put_parts({"parts": info["parts"][:1]}, [data[:half]])  # type: ignore[index]
        single = dataset()
        stored = opened(alice, data=single)
        assert put_bytes(stored.location, single).status_code == 200
        killed = srv.blobs / ".tmp" / "killed-put"
        killed.parent.mkdir(exist_ok=True)
        killed.write_bytes(b"half of a file")
        leftovers_now = [srv.blobs / "uploads" / file_id, srv.blobs / "files" / stored.file_id, killed]
        assert all(p.exists() for p in leftovers_now)

        wait_until(lambda: not any(p.exists() for p in leftovers_now), timeout=IDLE_S + 10,
                   what=f"the sweep of idle uploads: {[str(p) for p in leftovers_now if p.exists()]}")  # fmt: skip
        srv.assert_serving()
        # Their rows went too: nothing of either upload can be finished any more.
        assert_envelope(httpx.put(info["parts"][1]["URL"], content=data[half:]), 404)  # type: ignore[index]
        second = {"part_number": 2, "etag": hashlib.md5(data[half:]).hexdigest()}
        r = alice.post("/v1/files/multipart/complete",
                       json={"upload_id": upload_id, "file_id": file_id, "parts": [*parts, second]})  # fmt: skip
        assert_envelope(r, 404)
        assert_envelope(alice.post("/v1/files/multipart/abort", json={"upload_id": upload_id, "file_id": file_id}), 404)
        assert_envelope(alice.post(f"/v1/files/{stored.file_id}/preprocess"), 404)
        assert_envelope(put_bytes(stored.location, single), 404)
        # The finished file is untouched.
        assert listed_ids(alice) == {finished_id}
        assert alice.get(f"/v1/files/{finished_id}/content").content == finished
        assert (srv.blobs / "files" / finished_id).exists()


def test_puts_slower_than_the_idle_time_are_not_swept(server_factory: Callable[..., LiveServer]) -> None:
    """A single PUT and a part PUT that each take twice the idle time, their bytes trickling in: the uploads stay
    active while the bytes come (and their temporary files with them), and both finish."""
    srv = server_factory(env={"TUNEFORGE_STALE_UPLOAD_S": str(IDLE_S)})
    srv.create_keys(["alice"])
    with srv.http(srv.keys["alice"]) as alice:
        single, multi = dataset(), jsonl_bytes(valid_records(20))
        up = opened(alice, data=single)
        info = _initiate(alice, multi, 1)
        url = str(info["parts"][0]["URL"])  # type: ignore[index]
        slow = 2 * IDLE_S / 8
        with ThreadPoolExecutor(2) as pool:
            put_single = pool.submit(httpx.put, up.location, content=_pieces(single, 8, slow), timeout=30)
            put_part = pool.submit(httpx.put, url, content=_pieces(multi, 8, slow), timeout=30)
            r_single, r_part = put_single.result(), put_part.result()
        assert r_single.status_code == 200, r_single.text
        assert r_part.status_code == 200, r_part.text
        parts = [{"part_number": 1, "etag": r_part.headers["etag"].strip('"')}]
        r = alice.post("/v1/files/multipart/complete",
                       json={"upload_id": info["upload_id"], "file_id": info["file_id"], "parts": parts})  # fmt: skip
        assert r.status_code == 200, r.text
        assert alice.post(f"/v1/files/{up.file_id}/preprocess").status_code == 200
        assert alice.get(f"/v1/files/{up.file_id}/content").content == single
        assert alice.get(f"/v1/files/{info['file_id']}/content").content == multi


def test_a_part_whose_upload_is_aborted_while_it_is_sent_is_not_stored(
    server_factory: Callable[..., LiveServer],
) -> None:
    """The upload goes (here aborted; a sweep is the same) while a part PUT is still receiving: the PUT fails with a
    404 and leaves no part behind, whether it notices while receiving or only as it ends."""
    srv = server_factory(env={"TUNEFORGE_STALE_UPLOAD_S": str(IDLE_S)})
    srv.create_keys(["alice"])
    with srv.http(srv.keys["alice"]) as alice:
        data = jsonl_bytes(valid_records(20))
        info = _initiate(alice, data, 1)
        file_id = str(info["file_id"])
        aborted = threading.Event()

        def body() -> Iterator[bytes]:
            yield data[: len(data) // 2]
            assert aborted.wait(10)
            time.sleep(1.0)  # a beat of the PUT (every IDLE_S / 4) sees the upload gone
            yield data[len(data) // 2 :]

        with ThreadPoolExecutor(1) as pool:
            put = pool.submit(httpx.put, info["parts"][0]["URL"], content=body(), timeout=30)  # type: ignore[index]
            time.sleep(0.5)
            r = alice.post("/v1/files/multipart/abort", json={"upload_id": info["upload_id"], "file_id": file_id})
            aborted.set()
            assert r.status_code == 200, r.text
            assert_envelope(put.result(), 404)
        assert_nothing_stored(srv, alice, file_id)
