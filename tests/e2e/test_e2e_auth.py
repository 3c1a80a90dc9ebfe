"""Authentication and ownership against a live server (api-contract 6, 7): raw HTTP and the together SDK.

A missing, wrong or revoked key is a 401 in the error envelope; another owner's file is a 404 that never
shows its data, and no call of bob's can change alice's file.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import together
from e2e_support import (
    LiveServer,
    assert_envelope,
    listed_ids,
    open_upload,
    opened,
    tuneforge_cli,
    unique,
    valid_records,
    wait_processed_sdk,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(60)

# Every authenticated route, with a body where it needs one (auth must be checked before the body).
AUTHED_ROUTES = [
    ("GET", "/v1/files", None),
    ("GET", "/v1/files/file-00000000-0000-4000-8000-000000000000", None),
    ("GET", "/v1/files/file-00000000-0000-4000-8000-000000000000/content", None),
    ("DELETE", "/v1/files/file-00000000-0000-4000-8000-000000000000", None),
    ("POST", "/v1/files/file-00000000-0000-4000-8000-000000000000/preprocess", None),
    ("POST", "/v1/files", "form"),
    ("POST", "/v1/files/multipart/initiate", "json"),
    ("POST", "/v1/files/multipart/complete", "json"),
    ("POST", "/v1/files/multipart/abort", "json"),
    ("GET", "/v1/whoami", None),
    ("GET", "/v3/whoami", None),
]


def _send(http: httpx.Client, method: str, path: str, body: str | None, headers: dict[str, str]) -> httpx.Response:
    if body == "form":
        fields = {"purpose": "fine-tune", "file_name": "a.jsonl", "file_type": "jsonl", "checksum": "0" * 64}
        return http.request(method, path, files={k: (None, v) for k, v in fields.items()}, headers=headers)
    if body == "json":
        payload = {"upload_id": "u", "file_id": "f", "parts": [], "file_name": "a.jsonl", "file_size": 1}
        return http.request(method, path, json=payload, headers=headers)
    return http.request(method, path, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), AUTHED_ROUTES, ids=[f"{m} {p}" for m, p, _ in AUTHED_ROUTES])
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer tf-wrong-key", "Bearer", "Basic dXNlcjpwYXNz", "tf-no-scheme"],
    ids=["missing", "wrong", "empty", "basic", "no-scheme"],
)
def test_requests_without_a_valid_key_are_401(
    anon_http: httpx.Client, method: str, path: str, body: str | None, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = _send(anon_http, method, path, body, headers)
    body_json = assert_envelope(r, 401)
    assert body_json["error"]["type"] == "authentication_error"


def test_missing_key_message_says_what_to_send(anon_http: httpx.Client) -> None:
    assert_envelope(anon_http.get("/v1/files"), 401, "Authorization", "Bearer")


def test_sdk_with_a_wrong_key(server: LiveServer, valid_jsonl: Path) -> None:
    client = server.client("tf-" + unique(), max_retries=0)
    with pytest.raises(together.AuthenticationError):
        client.files.list()
    with pytest.raises(together.AuthenticationError):
        client.whoami()
    with pytest.raises(together.AuthenticationError):
        client.files.upload(file=valid_jsonl)


def test_a_revoked_key_stops_working_at_once(server: LiveServer, valid_jsonl: Path) -> None:
    name = f"temp-{unique()[:8]}"
    key = server.create_key(name, "alice")
    client = server.client(key, max_retries=0)
    f = client.files.upload(file=valid_jsonl)
    assert client.whoami().project_id == server.client(server.keys["alice"]).whoami().project_id

    out = server.revoke_key(name)
    assert "revoked" in out and name in out, out
    with pytest.raises(together.AuthenticationError):
        client.files.list()
    with server.http(key) as http:
        assert_envelope(http.get("/v1/files"), 401)
        assert_envelope(http.get("/v3/whoami"), 401)
    listing = tuneforge_cli("keys", "list", home=server.home)
    row = next(line for line in listing.splitlines() if name in line)
    assert "revoked" in row and key not in listing, listing

    # Other keys of the same owner keep working, and the owner's files stay.
    assert f.id in {x.id for x in server.client(server.keys["alice"]).files.list().data}


def test_revoke_by_key_id(server: LiveServer) -> None:
    name = f"byid-{unique()[:8]}"
    key = server.create_key(name, "carol")
    client = server.client(key, max_retries=0)
    key_id = client.whoami().api_key_id
    assert key_id
    out = server.revoke_key(key_id)
    assert key_id in out, out
    with pytest.raises(together.AuthenticationError):
        client.whoami()


@pytest.fixture
def alice_secret_file(alice: together.Together, tmp_path: Path) -> tuple[str, bytes, str]:
    marker = f"alice-secret-{unique()}"
    records = valid_records(2)
    records[0]["messages"][1]["content"] = marker
    path = write_jsonl(tmp_path / f"{marker}.jsonl", records)
    f = alice.files.upload(file=path)
    wait_processed_sdk(alice, f.id)
    return f.id, path.read_bytes(), marker


def test_bob_cannot_see_or_touch_alices_file(
    alice: together.Together,
    bob: together.Together,
    bob_http: httpx.Client,
    alice_secret_file: tuple[str, bytes, str],
) -> None:
    file_id, content, marker = alice_secret_file

    with pytest.raises(together.NotFoundError):
        bob.files.retrieve(file_id)
    with pytest.raises(together.NotFoundError):
        bob.files.content(file_id)
    with pytest.raises(together.NotFoundError):
        bob.files.delete(file_id)
    assert file_id not in {f.id for f in bob.files.list().data}

    for r in (
        bob_http.get(f"/v1/files/{file_id}"),
        bob_http.get(f"/v1/files/{file_id}/content"),
        bob_http.delete(f"/v1/files/{file_id}"),
        bob_http.post(f"/v1/files/{file_id}/preprocess"),
    ):
        assert_envelope(r, 404)
        assert marker not in r.text and content.decode() not in r.text

    # A multipart complete or abort naming alice's file does nothing to it.
    r = bob_http.post("/v1/files/multipart/complete", json={"upload_id": "x", "file_id": file_id, "parts": []})
    assert r.status_code in (400, 404), r.text
    assert marker not in r.text
    r = bob_http.post("/v1/files/multipart/abort", json={"upload_id": "x", "file_id": file_id})
    assert r.status_code == 404 and marker not in r.text, r.text
    assert file_id not in listed_ids(bob_http)

    # Alice's file is untouched.
    mine = alice.files.retrieve(file_id)
    assert mine.processing_status == "COMPLETED"
    assert alice.files.content(file_id).read() == content


def test_duplicate_detection_is_per_owner(
    bob: together.Together, bob_http: httpx.Client, alice_secret_file: tuple[str, bytes, str], tmp_path: Path
) -> None:
    file_id, content, _ = alice_secret_file
    # Bob uploading alice's exact bytes must not learn her file id from a 409.
    r = open_upload(bob_http, data=content, file_name="copy.jsonl")
    assert r.status_code == 302, r.text
    assert file_id not in r.text and file_id not in str(r.headers)
    path = tmp_path / "copy.jsonl"
    path.write_bytes(content)
    mine = bob.files.upload(file=path, raise_if_already_exists=True)
    assert mine.id != file_id


def test_upload_urls_are_bound_to_their_file(
    alice_http: httpx.Client, bob_http: httpx.Client, server: LiveServer
) -> None:
    # bob's signed URL, pointed at alice's pending upload, is refused: the signature names the file.
    data = b'{"text": "x"}\n'
    a = opened(alice_http, data=data)
    b = opened(bob_http, data=data + b"\n")
    forged = b.location.replace(b.file_id, a.file_id)
    r = httpx.put(forged, content=data)
    assert_envelope(r, 403, "signature")
    server.assert_serving()
