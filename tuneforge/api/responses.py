"""The error statuses each route really answers, as the OpenAPI schema states them.

Most follow from a route's shape, and `complete_schema` adds them to every operation from it:
- a key-protected route (its `security` comes from `get_principal`'s bearer scheme) answers 401;
- a route with parameters or a body answers 400 for a bad one (never FastAPI's 422: `errors.py` answers 400);
- a route with a body answers 413 when the body is over `TUNEFORGE_MAX_BODY_BYTES` (`body_limit.py`);
- a route with a path parameter names something that may not exist, or belong to another owner: 404.
The rest are facts of one route (a 409 for a file that a job still reads, a 403 for a signed URL), declared on
that route with `errors(...)`, next to the code that raises them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error, in the Together envelope."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "A parameter or the body is invalid; `error.param` names it",
    401: "The API key is missing, malformed, unknown or revoked",
    403: "The signed URL is invalid or expired, or the key that made it was revoked",
    404: "No such object for this key's owner (another owner's objects are never found)",
    409: "The object's state does not allow this now (the message says why and what to do)",
    413: "The request body (or upload) is over the server's limit",
    416: "The byte range is outside the archive",
    500: "A model server failed to start or to load the model (the message holds the end of its log)",
    502: "The model server went away during the request",
    503: "Every model server the memory budget holds is busy, or one did not start in time: retry later",
    507: "The model is larger than the whole serving memory budget",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for statuses its shape does not already imply."""
    return {status: {"model": ErrorEnvelope, "description": _DESCRIPTIONS[status]} for status in statuses}


def binary(media_type: str, description: str, *, status: int = 200) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` entry for a streamed body of `media_type` (used with `response_class=Response`)."""
    schema = {"type": "string", "format": "binary"}
    return {status: {"description": description, "content": {media_type: {"schema": schema}}}}


def _error_response(status: int) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorEnvelope"}
    return {"description": _DESCRIPTIONS[status], "content": {"application/json": {"schema": schema}}}


def complete_schema(app: FastAPI) -> None:
    """Make `app.openapi()` list the statuses that follow from each route's shape (see the module's docstring)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorEnvelope"] = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(components["ErrorEnvelope"].pop("$defs", {}))
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for operations in schema.get("paths", {}).values():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                implied = []
                if responses.pop("422", None) is not None:  # FastAPI adds it to every route with input
                    implied.append(400)
                if op.get("security"):
                    implied.append(401)
                if "requestBody" in op:
                    implied.append(413)
                if any(p.get("in") == "path" for p in op.get("parameters", [])):
                    implied.append(404)
                for status in implied:
                    responses.setdefault(str(status), _error_response(status))
                op["responses"] = dict(sorted(responses.items()))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
