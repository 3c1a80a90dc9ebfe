"""`GET /hardware[?model=]` and `GET /clusters/availability-zones` (api-contract 5.1, 5.2).

The options are this host's (`serve/hardware.py`: the CPU, and its GPUs by type and count), probed once per process;
`app.state.hardware` is the function that lists them (tests put another there). With `?model=`, each option says
whether that model's model server fits it: the need is the pool's own estimate (`serve.pool.estimate_memory`) of
the weights `?model=` names (the endpoints' resolver, `api/endpoints/service.make_resolver`: another owner's model
is "not found", as everywhere).
This server is one zone, "local".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import anyio
from fastapi import Query, Request

from tuneforge.api.deps import DbDep, PrincipalDep, SettingsDep
from tuneforge.api.fine_tunes.deps import CatalogDep
from tuneforge.api.hardware.schemas import (
    AvailabilityZones,
    HardwareAvailability,
    HardwareList,
    HardwarePricing,
    HardwarePublic,
    HardwareSpecs,
)
from tuneforge.api.responses import errors
from tuneforge.api.routing import api_router
from tuneforge.api.timestamps import iso
from tuneforge.serve.hardware import ZONES, HardwareOption

router = api_router(tags=["hardware"])


def _options(request: Request) -> list[HardwareOption]:
    listing: Callable[[], list[HardwareOption]] = request.app.state.hardware
    return listing()


def _item(option: HardwareOption, needed: int | None) -> HardwarePublic:
    status = None
    if needed is not None:
        status = HardwareAvailability(status="available" if option.fits(needed) else "insufficient")
    return HardwarePublic(
        id=option.id,
        pricing=HardwarePricing(),
        specs=HardwareSpecs(
            gpu_type=option.gpu_type,
            gpu_link=option.gpu_link,
            gpu_memory=option.gpu_memory_gb,
            gpu_count=option.gpu_count,
        ),
        updated_at=iso(option.updated_at),
        availability=status,
    )


@router.get("/hardware", response_model=HardwareList, response_model_exclude_none=True, responses=errors(404))
async def list_hardware(
    request: Request,
    principal: PrincipalDep,
    db: DbDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(description="Say, per option, whether this model's server fits it")] = None,
) -> HardwareList:
    """The hardware this host offers dedicated endpoints: its CPU (`cpu`) and its GPUs by type and count. Free."""
    needed = None
    if model is not None:
        resolve = request.app.state.endpoint_resolver  # what a replica of it would serve, and the memory it needs
        needed = await anyio.to_thread.run_sync(lambda: resolve(principal.owner, model).memory)
    options = await anyio.to_thread.run_sync(_options, request)
    return HardwareList(data=[_item(o, needed) for o in options])


@router.get("/clusters/availability-zones", response_model=AvailabilityZones)
def availability_zones(principal: PrincipalDep) -> AvailabilityZones:
    """The zones endpoints can run in: one, "local" (this host)."""
    return AvailabilityZones(avzones=list(ZONES))
