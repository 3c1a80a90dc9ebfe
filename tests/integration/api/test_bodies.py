"""Every JSON request body refuses strings the database cannot store (a lone surrogate, a NUL) with a 400 naming
the field (api/bodies.py): once a 500 with a dropped keep-alive connection on SQLite."""

from __future__ import annotations

import json

import pytest

from tuneforge.catalog.entries import SMOLLM2

MODEL = SMOLLM2.name


STRING_FIELDS = {
    "/v1/fine-tunes/estimate-price": {"training_file": "file-x", "model": MODEL, "validation_file": "file-y"},
    "/v1/fine-tunes/preview": {"training_file": "file-x", "model": MODEL},
    "/v1/files/multipart/abort": {"upload_id": "u", "file_id": "f"},
    "/v1/files/multipart/complete": {"upload_id": "u", "file_id": "f", "parts": []},
    "/v1/files/multipart/initiate": {
        "file_name": "a.jsonl",
        "file_size": 10,
        "num_parts": 1,
        "file_type": "jsonl",
        "checksum": "0" * 64,
    },
}


@pytest.mark.parametrize("bad", ["\\udc80", "a\\u0000b"], ids=["lone-surrogate", "nul"])
@pytest.mark.parametrize("route", list(STRING_FIELDS))
def test_every_string_field_of_every_body_refuses_what_cannot_be_stored(ft_shared, route: str, bad: str) -> None:
    """Each string field in turn holds a lone surrogate or a NUL: a 400 naming that field, never a 500."""
    for field, value in STRING_FIELDS[route].items():
        if not isinstance(value, str):
            continue
        text = json.dumps(STRING_FIELDS[route] | {field: "@@"}).replace('"@@"', f'"{bad}"')
        r = ft_shared.client.post(route, content=text.encode(), headers=ft_shared.alice
                                  | {"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400, (route, field, r.status_code, r.text)
        assert r.json()["error"]["param"] == field, (route, field, r.text)


@pytest.mark.parametrize("path", sorted(STRING_FIELDS))
def test_a_body_that_is_not_json_is_a_400_that_says_so(api, path: str) -> None:
    headers = {**api.alice, "Content-Type": "application/json"}
    r = api.client.post(path, content=b'{"file_id": "f", ', headers=headers)
    assert r.status_code == 400, r.text
    assert "not valid JSON" in r.json()["error"]["message"] and r.json()["error"]["param"] is None
    # Without a key, the key is what is wrong: it is checked before the body is read.
    r = api.client.post(path, content=b'{"file_id": "f", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text
