"""The app's own surface: OpenAPI docs, health, and the error envelope on unknown routes."""


def test_openapi_docs_list_the_files_routes(api):
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/preprocess", "/v1/files/multipart/initiate"):
        assert path in paths


def test_health_needs_no_key(api):
    assert api.client.get("/health").json()["status"] == "ok"


def test_unknown_route_and_wrong_method_use_the_envelope(api):
    missing = api.client.get("/v1/nope", headers=api.alice)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong = api.client.put("/v1/files", headers=api.alice)
    assert wrong.status_code == 405 and "message" in wrong.json()["error"]


def test_request_validation_errors_are_400_with_the_field_named(api):
    r = api.client.post("/v1/files", data={"purpose": "fine-tune"}, headers=api.alice)
    assert r.status_code == 400
    body = r.json()["error"]
    assert body["type"] == "invalid_request_error" and "file_name" in body["message"]
