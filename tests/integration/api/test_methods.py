"""405 answers name, in `Allow`, exactly the methods the schema gives the path, for every path of the schema."""

from __future__ import annotations

import re

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x-1", template)


def _routed_elsewhere(paths: dict, template: str, method: str) -> bool:
    """Another path of the schema takes `method` on this one's concrete form (`GET /v1/fine-tunes/preview` is a
    retrieve of a job called "preview": a 404, not a 405)."""
    concrete = _concrete(template)
    for other, operations in paths.items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(other))
        if other != template and method.lower() in operations and re.fullmatch(pattern, concrete):
            return True
    return False


def test_every_405_names_the_methods_of_its_path(api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    checked = 0
    for template, operations in paths.items():
        allowed = sorted(m.upper() for m in operations)
        for method in METHODS:
            if method in allowed or _routed_elsewhere(paths, template, method):
                continue
            r = api.client.request(method, _concrete(template), headers=api.alice)
            assert r.status_code == 405, (method, template, r.status_code, r.text)
            assert r.headers["allow"] == ", ".join(allowed), (method, template, r.headers["allow"])
            assert r.json()["error"]["type"] == "method_not_allowed"
            checked += 1
    assert checked > 50


def test_a_literal_path_is_not_confused_with_a_templated_one(api) -> None:
    # `/v1/fine-tunes/preview` is POST only, though `/v1/fine-tunes/{job_id}` answers GET and DELETE.
    r = api.client.request("PUT", "/v1/fine-tunes/preview", headers=api.alice)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = api.client.request("PUT", "/v1/fine-tunes/ft-1", headers=api.alice)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    r = api.client.request("DELETE", "/v1/models/org/some-model", headers=api.alice)  # model names hold slashes
    assert r.status_code == 405 and r.headers["allow"] == "GET"
