"""FastAPI dependencies as `Annotated` aliases: settings, database, blob store, the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tuneforge.errors import AuthenticationError
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store.keys import find_active_key


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner of everything they create, and the key they used."""

    owner: str
    key_id: str
    key_name: str


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


# Read for the schema only (it marks each key-protected operation with `security`, which the schema's 401s and the
# tests' auth matrix follow); `get_principal` reads the header itself, to tell a missing key from a malformed one.
_bearer = HTTPBearer(auto_error=False, scheme_name="APIKey", description="Authorization: Bearer <API key>")


def get_principal(
    request: Request,
    db: Annotated[Database, Depends(get_db)],
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, as `routing.AuthFirstRoute` found it before the request was read (or now, outside such a route)."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    return authenticate(request, db)


def authenticate(request: Request, db: Database) -> Principal:
    """Who the request's API key belongs to; AuthenticationError (401) for a missing, malformed or revoked key."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if not header:
        raise AuthenticationError("Missing API key: send the header 'Authorization: Bearer <key>'")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'")
    with db.session() as s:
        key = find_active_key(s, secret=secret.strip())
        if key is None:
            raise AuthenticationError("Invalid or revoked API key")
        return Principal(owner=key.owner, key_id=key.id, key_name=key.name)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
