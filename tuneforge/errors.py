"""The TuneForgeError tree: every domain error a user can see.

Only `api/errors.py` turns these into HTTP answers; each class carries the status it maps to and the
Together error `type`, so the mapping is one lookup, not a tower of cases.
"""

from __future__ import annotations


class TuneForgeError(Exception):
    """Root of every error tuneforge raises on purpose."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(TuneForgeError):
    """The request is malformed or a parameter is out of range (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(TuneForgeError):
    """Missing, unknown or revoked API key (401)."""

    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(TuneForgeError):
    """The caller may not do this (403)."""

    status_code = 403
    error_type = "permission_denied"


class NotFoundError(TuneForgeError):
    """No such resource for this owner (404); never says whether another owner has it."""

    status_code = 404
    error_type = "not_found"


class ConflictError(TuneForgeError):
    """The request clashes with the current state (409)."""

    status_code = 409
    error_type = "conflict"


class DuplicateFileError(ConflictError):
    """The same content was uploaded before by this owner (409 with a top-level `file_id`)."""

    def __init__(self, message: str, *, file_id: str) -> None:
        super().__init__(message)
        self.file_id = file_id


class PayloadTooLargeError(TuneForgeError):
    """A body or file is over a size limit (413)."""

    status_code = 413
    error_type = "request_too_large"


class UpstreamUnavailableError(TuneForgeError):
    """A service the request needs (the model hub) could not be reached; retrying later may work (503)."""

    status_code = 503
    error_type = "service_unavailable"


class StorageError(TuneForgeError):
    """The blob store failed (500)."""

    status_code = 500
    error_type = "storage_error"
