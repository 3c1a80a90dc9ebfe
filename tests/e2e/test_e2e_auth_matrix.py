"""The auth matrix, read off the live server's `/openapi.json`: a route added tomorrow is covered without editing
this file.

- Every operation but the signed URLs and `/health` is key-protected (the schema marks it with `security`), and
  answers 401 in the error envelope to no key, a malformed key, a wrong key and a revoked key, checked before any
  parameter or body (the requests here carry a bad body on purpose).
- The signed operations (`/uploads/…`, `/downloads/…`) answer 403 to a forged signature.
- As another owner, every operation that names alice's file or job (in its path, query or body) answers 404, no
  answer of bob's carries alice's ids or data, and alice's file and job are unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2e_support import (
    LiveServer,
    assert_envelope,
    start_server,
    unique,
    valid_records,
    wait_processed_sdk,
    wait_until,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(120)

SIGNED = {
    ("PUT", "/uploads/{file_id}"),
    ("PUT", "/uploads/{file_id}/parts/{part_number}"),
    ("GET", "/downloads/fine-tunes/{job_id}/tokenized-dataset"),
}
OPEN = {("GET", "/health")}
BAD_CREDENTIALS = {
    "no key": None,
    "empty bearer": "Bearer",
    "wrong key": "Bearer tf-" + "0" * 40,
    "basic auth": "Basic dXNlcjpwYXNz",
    "no scheme": "tf-no-scheme",
}


FILLERS: dict[Any, Any] = {"string": "x", "integer": 1, "number": 1.0, "boolean": False, "array": [], None: "x"}


class Alice:
    """What alice owns, by the parameter names the API uses for it."""

    def __init__(self, file_id: str, job_id: str, model: str, marker: str, content: bytes, base: str) -> None:
        self.values = {
            "other:model": base,  # a body's `model` is the catalog model to train or tokenize for
            "file_id": file_id,
            "training_file": file_id,
            "validation_file": file_id,
            "job_id": job_id,
            "ft_id": job_id,
            "from_checkpoint": job_id,
            "model_id": model,
        }
        self.file_id, self.job_id, self.model, self.marker, self.content = file_id, job_id, model, marker, content

    def leaked_in(self, text: str) -> list[str]:
        return [v for v in (self.file_id, self.job_id, self.model, self.marker) if v in text]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Alice, str]]:
    """A server (fake training runs) where alice has a file and a completed job, bob has a key, and a key of
    alice's has been revoked."""
    root = tmp_path_factory.mktemp("auth-matrix")
    server = start_server(root / "home", root / "server.log", env={"TUNEFORGE_EXECUTOR": "fake"})
    try:
        server.create_keys(["alice", "bob"])
        revoked_name = f"alice-old-{unique()[:8]}"
        revoked = server.create_key(revoked_name, "alice")
        server.revoke_key(revoked_name)
        alice = server.client(server.keys["alice"])
        marker = f"alice-secret-{unique()}"
        records = valid_records(3)
        records[0]["messages"][1]["content"] = marker
        path = write_jsonl(root / "alice.jsonl", records)
        f = alice.files.upload(file=path, check=False)
        wait_processed_sdk(alice, f.id)
        base = alice.models.list()[0].id
        job = alice.fine_tuning.create(training_file=f.id, model=base, n_epochs=1)
        done = wait_until(
            lambda: (j := alice.fine_tuning.retrieve(job.id)).status == "completed" and j,
            timeout=60,
            what="alice's fake job to complete",
        )
        yield server, Alice(f.id, job.id, done.x_model_output_name, marker, path.read_bytes(), base), revoked
    finally:
        server.finish()


def _operations(server: LiveServer) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    schema = httpx.get(f"{server.base}/openapi.json", timeout=30).json()
    ops = []
    for template, operations in schema["paths"].items():
        for method, op in operations.items():
            ops.append((method.upper(), template, op, schema))
    assert len(ops) >= 25, [f"{m} {p}" for m, p, _, _ in ops]
    return ops


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _request(
    method: str, template: str, op: dict[str, Any], schema: dict[str, Any], values: dict[str, str]
) -> tuple[dict[str, Any], bool]:
    """httpx arguments for `op`, with alice's ids wherever a parameter or body field is named for them, and
    whether any was used. Other path parameters get "1"; other required body fields a value of their type."""
    named = False
    path = template
    params: dict[str, str] = {}
    for p in op.get("parameters", []):
        value = values.get(p["name"])
        if p["in"] == "path":
            path = path.replace("{" + p["name"] + "}", value or "1")
        elif p["in"] == "query" and value is not None:
            params[p["name"]] = value
        named = named or value is not None
    kwargs: dict[str, Any] = {"url": path, "params": params}
    body = op.get("requestBody", {}).get("content", {})
    for media, spec in body.items():
        body_schema = _resolve(schema, spec.get("schema", {}))
        props = body_schema.get("properties", {})
        fields = {k: values[k] for k in props if k in values}
        named = named or bool(fields)
        for name in body_schema.get("required", []):  # the rest of a valid body, so only ownership can fail
            fields.setdefault(name, values.get(f"other:{name}", FILLERS.get(_resolve(schema, props[name]).get("type"))))
        if media == "application/json":
            kwargs["json"] = fields
        else:
            kwargs["files"] = {k: (None, v) for k, v in fields.items()} or {"x": (None, "y")}
    return kwargs, named


def test_every_operation_is_key_protected_or_signed(world: tuple[LiveServer, Alice, str]) -> None:
    server, _, _ = world
    unprotected = {(m, p) for m, p, op, _ in _operations(server) if not op.get("security")}
    assert unprotected == SIGNED | OPEN, (
        f"operations without an API key that are neither signed URLs nor /health: {unprotected - SIGNED - OPEN}"
    )


def test_bad_credentials_get_401_on_every_protected_operation(world: tuple[LiveServer, Alice, str]) -> None:
    server, alice, revoked = world
    failures = []
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for method, template, op, schema in _operations(server):
            if not op.get("security"):
                continue
            kwargs, _ = _request(method, template, op, schema, alice.values)
            broken = {"url": kwargs["url"], "content": b'{"not json', "params": {"resolution": "-x", "limit": "?"}}
            for label, header in {**BAD_CREDENTIALS, "revoked key": f"Bearer {revoked}"}.items():
                headers = {"Authorization": header} if header else {}
                # The key is checked first: a broken body or query changes nothing.
                r = http.request(method, headers={**headers, "Content-Type": "application/json"}, **broken)
                try:
                    assert_envelope(r, 401)
                except AssertionError as exc:
                    failures.append(f"{method} {template} with {label} and a broken body: {exc}")
                r = http.request(method, headers=headers, **kwargs)
                try:
                    body = assert_envelope(r, 401)
                    assert body["error"]["type"] == "authentication_error", body
                    assert not alice.leaked_in(r.text), r.text
                except AssertionError as exc:
                    failures.append(f"{method} {template} with {label}: {exc}")
    assert not failures, "\n".join(failures)


def test_signed_operations_refuse_a_forged_signature(world: tuple[LiveServer, Alice, str]) -> None:
    server, alice, _ = world
    forged = {"expires": "9999999999", "kid": "key-0", "sig": "0" * 64}
    failures = []
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for method, template, op, schema in _operations(server):
            if (method, template) not in SIGNED:
                continue
            kwargs, _ = _request(method, template, op, schema, alice.values)
            r = http.request(method, **{**kwargs, "params": forged}, content=b"x")
            try:
                assert_envelope(r, 403, "signature")
                assert not alice.leaked_in(r.text.replace(alice.file_id, "").replace(alice.job_id, "")), r.text
            except AssertionError as exc:
                failures.append(f"{method} {template}: {exc}")
    assert not failures, "\n".join(failures)


def test_another_owner_gets_404_for_everything_of_alices(world: tuple[LiveServer, Alice, str]) -> None:
    server, alice, _ = world
    failures = []
    with server.http(server.keys["bob"]) as bob:
        for method, template, op, schema in _operations(server):
            if not op.get("security"):
                continue
            kwargs, named = _request(method, template, op, schema, alice.values)
            r = bob.request(method, **kwargs)
            try:
                if named:
                    assert_envelope(r, 404)
                else:
                    assert r.status_code < 500, r.text
                leaked = [v for v in alice.leaked_in(r.text) if v not in str(kwargs)]
                assert not leaked, f"bob's answer shows alice's {leaked}: {r.text[:300]}"
            except AssertionError as exc:
                failures.append(f"{method} {template}: {exc}")
    assert not failures, "\n".join(failures)

    a = server.client(server.keys["alice"])
    assert a.files.retrieve(alice.file_id).processing_status == "COMPLETED"
    assert a.files.content(alice.file_id).read() == alice.content
    assert a.fine_tuning.retrieve(alice.job_id).status == "completed"
