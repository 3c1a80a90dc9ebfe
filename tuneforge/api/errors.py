"""The one place where errors become HTTP answers, all in Together's envelope.

`{"error": {"message", "type", "param", "code"}}`, for domain errors, request-validation failures,
unknown routes and unexpected crashes alike (a framework's `{"detail": ...}` never leaks out).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.errors import DuplicateFileError, TuneForgeError

log = logging.getLogger("tuneforge.api")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    first_param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            where = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "")
            return f"The request body is not valid JSON (at character {where}: {reason})", None
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        problems.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "Invalid request: " + "; ".join(problems), first_param


def allowed_methods(request: Request) -> list[str]:
    """The methods the API answers on this request's path, read from its OpenAPI schema (the routes of included
    routers are not inspectable). Where a literal path and a templated one both match (`/fine-tunes/preview` and
    `/fine-tunes/{job_id}`), the literal one names the resource, as the router itself prefers it. The schema drops
    `:path` from a template, so a last parameter that spans slashes (model names) is tried when nothing else fits."""
    paths = request.app.openapi().get("paths", {})
    for last in ("[^/]+", ".+"):
        found: list[tuple[int, list[str]]] = []
        for template, operations in paths.items():
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            if pattern.endswith("[^/]+"):
                pattern = pattern[: -len("[^/]+")] + last
            if re.fullmatch(pattern, request.url.path):
                found.append((template.count("{"), [m.upper() for m in operations]))
        if found:
            fewest = min(n for n, _ in found)
            return sorted({m for n, methods in found if n == fewest for m in methods})
    return []


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneForgeError)
    async def _domain(_request: Request, exc: TuneForgeError) -> JSONResponse:
        body = error_body(exc.message, exc.error_type, exc.param, exc.code)
        headers = {}
        if isinstance(exc, DuplicateFileError):
            body["file_id"] = exc.file_id
        if exc.status_code == 409:
            # The SDKs retry a 409 twice more; ours state facts that a retry seconds later does not change.
            headers["x-should-retry"] = "false"
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
            headers["x-should-retry"] = "false"
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route whose path matched, not of every route on the path.
            allowed = allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        error_type = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, error_type), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error"),
            status_code=500,
            headers={"x-should-retry": "false"},
        )
