"""The multipart upload flow (api-contract 1.4) and its failure cases, against the real app."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import pytest

LINE = b'{"text": "hello multipart world"}\n'


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _initiate(api, data: bytes, parts: int, **extra):
    body = {
        "file_name": "big.jsonl",
        "file_size": len(data),
        "num_parts": parts,
        "purpose": "fine-tune",
        "file_type": "jsonl",
        "checksum": sha256(data),
    } | extra
    return api.client.post("/v1/files/multipart/initiate", json=body, headers=api.alice)


def _put(api, url: str, data: bytes):
    parts = urlsplit(url)
    return api.client.put(f"{parts.path}?{parts.query}", content=data)


def _split(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i * size : (i + 1) * size] for i in range(n)]


def _upload_parts(api, init, chunks):
    etags = []
    for part, chunk in zip(init["parts"], chunks, strict=True):
        r = _put(api, part["URL"], chunk)
        assert r.status_code == 200, r.text
        etags.append({"part_number": part["PartNumber"], "etag": r.headers["ETag"].strip('"')})
    return etags


def _wait_processed(api, file_id: str) -> dict:
    import time

    for _ in range(200):
        body = api.client.get(f"/v1/files/{file_id}", headers=api.alice).json()
        if body["processing_status"] not in ("QUEUED", "RUNNING"):
            return body
        time.sleep(0.05)
    raise AssertionError("processing did not finish")


def test_multipart_round_trip(api):
    data = LINE * 3000
    init = _initiate(api, data, 3).json()
    assert [p["PartNumber"] for p in init["parts"]] == [1, 2, 3]
    etags = _upload_parts(api, init, _split(data, 3))
    assert etags[0]["etag"] == hashlib.md5(_split(data, 3)[0]).hexdigest()
    done = api.client.post(
        "/v1/files/multipart/complete",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags},
        headers=api.alice,
    )
    assert done.status_code == 200, done.text
    obj = done.json()
    assert obj["id"] == init["file_id"] and obj["bytes"] == len(data) and obj["FileType"] == "jsonl"
    assert _wait_processed(api, obj["id"])["processing_status"] == "COMPLETED"
    content = api.client.get(f"/v1/files/{obj['id']}/content", headers=api.alice)
    assert content.content == data
    assert api.client.get("/v1/files", headers=api.alice).json()["data"][0]["id"] == obj["id"]
    blobs = api.settings.home / "blobs"
    assert not list((blobs / "uploads").glob("**/part-*"))


def test_complete_with_a_wrong_etag_fails_and_stores_nothing(api):
    data = LINE * 100
    init = _initiate(api, data, 2).json()
    etags = _upload_parts(api, init, _split(data, 2))
    etags[1]["etag"] = "0" * 32
    r = api.client.post(
        "/v1/files/multipart/complete",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags},
        headers=api.alice,
    )
    assert r.status_code == 400
    assert "part 2: etag" in r.json()["error"]["message"]
    assert api.client.get("/v1/files", headers=api.alice).json()["data"] == []
    assert not (api.settings.home / "blobs" / "files" / init["file_id"]).exists()


def test_complete_with_a_missing_part_is_refused(api):
    data = LINE * 100
    init = _initiate(api, data, 3).json()
    etags = _upload_parts(api, {"parts": init["parts"][:2]}, _split(data, 3)[:2])
    r = api.client.post(
        "/v1/files/multipart/complete",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags},
        headers=api.alice,
    )
    assert r.status_code == 400
    assert "each part number 1..3" in r.json()["error"]["message"]


def test_parts_that_do_not_hash_to_the_checksum_are_refused(api):
    data = LINE * 100
    init = _initiate(api, data, 2).json()
    tampered = _split(data.replace(b"hello", b"HELLO"), 2)
    etags = _upload_parts(api, init, tampered)
    r = api.client.post(
        "/v1/files/multipart/complete",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags},
        headers=api.alice,
    )
    assert r.status_code == 400
    assert "checksum mismatch" in r.json()["error"]["message"]


def test_abort_removes_the_parts(api):
    data = LINE * 100
    init = _initiate(api, data, 2).json()
    _upload_parts(api, {"parts": init["parts"][:1]}, _split(data, 2)[:1])
    r = api.client.post(
        "/v1/files/multipart/abort",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"]},
        headers=api.alice,
    )
    assert r.status_code == 200
    assert not list((api.settings.home / "blobs").glob("uploads/**/part-*"))
    # The part URLs no longer work.
    assert _put(api, init["parts"][1]["URL"], b"x").status_code == 404


def test_bob_cannot_complete_alices_upload(api):
    data = LINE * 10
    init = _initiate(api, data, 1).json()
    etags = _upload_parts(api, init, [data])
    r = api.client.post(
        "/v1/files/multipart/complete",
        json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags},
        headers=api.bob,
    )
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_parts": 0}, "num_parts"),
        ({"file_size": 0}, "file_size"),
        ({"purpose": "train"}, "purpose"),
        ({"checksum": "nope"}, "SHA-256"),
    ],
)
def test_bad_initiate_requests(api, extra, message):
    r = _initiate(api, LINE, 1, **extra)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_oversized_initiate_is_413(api):
    r = _initiate(api, LINE, 1, file_size=api.settings.max_file_bytes + 1)
    assert r.status_code == 413


def test_part_bigger_than_the_file_is_refused(api):
    init = _initiate(api, LINE, 1).json()
    r = _put(api, init["parts"][0]["URL"], LINE * 3)
    assert r.status_code == 413


def test_parts_can_never_store_more_than_the_declared_file(api):
    """8 parts, each as large as the whole declared file: the first fits (a small file's part may be all of it),
    every later one is refused, and what is stored never passes the declared size."""
    data = LINE * 200
    init = _initiate(api, data, 8).json()
    urls = [p["URL"] for p in init["parts"]]
    assert _put(api, urls[0], data).status_code == 200
    for url in urls[1:]:
        r = _put(api, url, data)
        assert r.status_code == 413 and "no room left" in r.json()["error"]["message"], r.text
    stored = list((api.settings.home / "blobs").glob(f"uploads/{init['file_id']}/part-*"))
    assert sum(p.stat().st_size for p in stored) <= len(data)
    assert _put(api, urls[0], data[:10]).status_code == 200  # a part sent again replaces its earlier bytes


def test_a_large_files_parts_are_held_to_the_declared_part_size(api):
    """Above the SDK's smallest part, a part may hold the file split evenly, not more: 8 parts of a 48 MiB file
    hold 6 MiB each (as the SDK sends them), and a 7 MiB part is refused before it is stored."""
    size = 48 << 20
    body = {"file_name": "big.jsonl", "file_size": size, "num_parts": 8, "purpose": "fine-tune",
            "file_type": "jsonl", "checksum": "0" * 64}  # fmt: skip
    init = api.client.post("/v1/files/multipart/initiate", json=body, headers=api.alice).json()
    url = urlsplit(init["parts"][0]["URL"])
    r = api.client.put(f"{url.path}?{url.query}", content=b"x" * (7 << 20))
    assert r.status_code == 413, r.text
    assert not list((api.settings.home / "blobs").glob(f"uploads/{init['file_id']}/part-*"))
    r = api.client.put(f"{url.path}?{url.query}", content=b"x" * (6 << 20))
    assert r.status_code == 200, r.text
