"""Who am I: `/v1/whoami` (SDK 2.x `client.whoami()`) and `/v3/whoami` (the CLI's call before every command)."""

from __future__ import annotations

from typing import Any

from tuneforge.api.deps import PrincipalDep
from tuneforge.api.routing import api_router

router = api_router(tags=["identity"])
router_v3 = api_router(tags=["identity"])


@router.get("/whoami")
def whoami(principal: PrincipalDep) -> dict[str, Any]:
    return {
        "api_key_id": principal.key_id,
        "organization_id": principal.owner,
        "organization_name": principal.owner,
        "project_id": principal.owner,
        "project_name": principal.owner,
        "project_slug": principal.owner,
        "user_id": principal.owner,
    }


@router_v3.get("/whoami")
def whoami_v3(principal: PrincipalDep) -> dict[str, Any]:
    return {
        "type": "project_api_key",
        "api_key": {"id": principal.key_id, "name": principal.key_name},
        "organization": {"id": principal.owner, "name": principal.owner},
        "project": {"id": principal.owner, "name": principal.owner, "slug": principal.owner},
    }
