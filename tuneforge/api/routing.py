"""Routers whose routes check the API key first.

FastAPI reads and parses a request's body before it solves the dependencies, so with plain routes a broken body
is a 400 for a caller with no key at all. `AuthFirstRoute` authenticates a key-protected route's caller before
anything of the request is read, and hands the principal to `deps.get_principal`; every router is made by
`api_router`, so no route can skip it (`tests/e2e/test_e2e_auth_matrix.py` sends broken bodies with bad keys to
every operation of the schema).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from tuneforge.api.deps import authenticate, get_db, get_principal


def _needs_key(dependant: Dependant) -> bool:
    return any(d.call is get_principal or _needs_key(d) for d in dependant.dependencies)


class AuthFirstRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not _needs_key(self.dependant):
            return handler

        async def key_first(request: Request) -> Response:
            request.state.principal = await run_in_threadpool(authenticate, request, get_db(request))
            return await handler(request)

        return key_first


def api_router(**kwargs: Any) -> APIRouter:
    """An APIRouter of `AuthFirstRoute`s."""
    return APIRouter(route_class=AuthFirstRoute, **kwargs)
