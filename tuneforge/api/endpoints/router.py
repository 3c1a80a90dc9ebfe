"""`/endpoints` (api-contract 5.1): create, list, retrieve, update (display name, state, autoscaling, inactive
timeout) and delete dedicated endpoints, per owner (another owner's are "not found")."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Query, Request, Response

from tuneforge.api.deps import DbDep, PrincipalDep, SettingsDep
from tuneforge.api.endpoints import service
from tuneforge.api.endpoints.schemas import (
    AdapterAdded,
    AdapterItem,
    AdapterList,
    AdapterRef,
    AdapterRemoved,
    CreateEndpoint,
    EndpointList,
    EndpointPublic,
    UpdateEndpoint,
)
from tuneforge.api.responses import errors
from tuneforge.api.routing import api_router
from tuneforge.endpoints.supervisor import EndpointSupervisor
from tuneforge.store import endpoints as repo

router = api_router(prefix="/endpoints", tags=["endpoints"])


def _supervisor(request: Request) -> EndpointSupervisor:
    supervisor: EndpointSupervisor = request.app.state.endpoints
    return supervisor


@router.post("", response_model=EndpointPublic, responses=errors(404))
async def create_endpoint(
    request: Request, body: CreateEndpoint, principal: PrincipalDep, db: DbDep, settings: SettingsDep,
    availability_zone: Annotated[str | None, Query()] = None,
) -> EndpointPublic:  # fmt: skip
    """Create a dedicated endpoint for a catalog model or one of your fine-tuned models; it starts at once unless
    `state` is STOPPED. Poll it until `state` is STARTED, then pass its `name` as `model`."""
    supervisor = _supervisor(request)
    resolve, options = request.app.state.endpoint_resolver, request.app.state.hardware
    row = await anyio.to_thread.run_sync(
        lambda: service.create(
            db,
            settings,
            supervisor,
            resolve,
            owner=principal.owner,
            body=body,
            zone=availability_zone,
            options=options(),
        )
    )
    return service.public(row, supervisor)


@router.get("", response_model=EndpointList)
def list_endpoints(
    principal: PrincipalDep, db: DbDep,
    type: Annotated[str | None, Query(description="dedicated or serverless")] = None,
    mine: Annotated[bool | None, Query(description="only yours (every endpoint listed here is)")] = None,
    usage_type: Annotated[str | None, Query()] = None,
) -> EndpointList:  # fmt: skip
    """Your dedicated endpoints, oldest first (serverless models are not endpoints here: GET /v1/models)."""
    if type == "serverless":
        return EndpointList(data=[])
    with db.session() as s:
        rows = repo.list_endpoints(s, owner=principal.owner)
        return EndpointList(data=[service.list_item(r) for r in rows])


@router.get("/{endpoint_id}", response_model=EndpointPublic)
def retrieve_endpoint(request: Request, endpoint_id: str, principal: PrincipalDep, db: DbDep) -> EndpointPublic:
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=principal.owner)
        return service.public(row, _supervisor(request))


@router.patch("/{endpoint_id}", response_model=EndpointPublic)
async def update_endpoint(
    request: Request, endpoint_id: str, body: UpdateEndpoint, principal: PrincipalDep, db: DbDep,
    settings: SettingsDep,
) -> EndpointPublic:  # fmt: skip
    """Change the display name, autoscaling (either bound alone is merged with the stored one) or inactive
    timeout, or start (`state: STARTED`) or stop (`STOPPED`) the endpoint."""
    supervisor = _supervisor(request)
    row = await anyio.to_thread.run_sync(
        lambda: service.update(db, settings, supervisor, owner=principal.owner, endpoint_id=endpoint_id, body=body)
    )
    return service.public(row, supervisor)


@router.delete("/{endpoint_id}", status_code=204, responses=errors())
def delete_endpoint(request: Request, endpoint_id: str, principal: PrincipalDep, db: DbDep) -> Response:
    """Delete the endpoint; its replicas stop."""
    service.delete(db, _supervisor(request), owner=principal.owner, endpoint_id=endpoint_id)
    return Response(status_code=204)


@router.get("/{endpoint_id}/adapters", response_model=AdapterList)
def list_adapters(endpoint_id: str, principal: PrincipalDep, db: DbDep) -> AdapterList:
    """The LoRA outputs this endpoint's replicas serve besides its own model, by `model_id`."""
    row, models = service.adapter_ids(db, owner=principal.owner, endpoint_id=endpoint_id)
    return AdapterList(data=[AdapterItem(adapter_name=m, endpoint_name=row.name, model_id=f"{row.name}:{m}")
                             for m in models])  # fmt: skip


@router.post("/{endpoint_id}/adapters", response_model=AdapterAdded)
async def add_adapter(request: Request, endpoint_id: str, body: AdapterRef, principal: PrincipalDep,
                      db: DbDep) -> AdapterAdded:  # fmt: skip
    """Serve another LoRA output of the endpoint's base model on it: `model_id` is `<endpoint name>:<output>`, and
    chat takes it as `model`."""
    resolve = request.app.state.endpoint_resolver
    owner, model_id = principal.owner, body.model_id
    model_id = await anyio.to_thread.run_sync(
        lambda: service.add_adapter(db, resolve, owner=owner, endpoint_id=endpoint_id, model_id=model_id)
    )
    return AdapterAdded(model_id=model_id)


@router.delete("/{endpoint_id}/adapters", response_model=AdapterRemoved)
def remove_adapter(endpoint_id: str, body: AdapterRef, principal: PrincipalDep, db: DbDep) -> AdapterRemoved:
    """Stop serving an adapter on the endpoint (the body names it, as the SDK sends it)."""
    service.remove_adapter(db, owner=principal.owner, endpoint_id=endpoint_id, model_id=body.model_id)
    return AdapterRemoved(deleted=True, model_id=body.model_id)
