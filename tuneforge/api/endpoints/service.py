"""Dedicated endpoints as the API sees them: the checks of create and update (hardware, model, memory budget,
replica counts), the public shapes, and the resolver the supervisor uses to know what a replica serves.

The state moves only through the store's `transition` (the table in `store/endpoint_states.py`); the supervisor
(`tuneforge/endpoints/supervisor.py`) does the rest of the lifecycle.
"""

from __future__ import annotations

import re
import time
import uuid

from tuneforge.api.endpoints.schemas import (
    Autoscaling,
    CreateEndpoint,
    EndpointListItem,
    EndpointPublic,
    UpdateEndpoint,
)
from tuneforge.api.inference import service as inference
from tuneforge.api.timestamps import iso
from tuneforge.catalog.registry import Catalog
from tuneforge.endpoints.supervisor import EndpointSupervisor, Resolver, Served
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.ids import new_endpoint_id
from tuneforge.serve import hardware
from tuneforge.serve.pool import estimate_memory
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store import endpoints as repo
from tuneforge.store.endpoint_states import LIVE, EndpointState
from tuneforge.store.tables import EndpointRow

GIB = float(1 << 30)


def make_resolver(db: Database, catalog: Catalog, blobs: BlobStore, settings: Settings) -> Resolver:
    """(owner, model) -> what a replica serves and the memory it needs: the serverless rules of `inference.resolve`
    (a LoRA output is an adapter on its base; a full fine-tune or a catalog model is served as itself)."""

    def resolve(owner: str, model: str) -> Served:
        target = inference.resolve(db, catalog, owner=owner, model=model)
        size = inference.weights_bytes(blobs, settings.home / "models", catalog, target.base)
        return Served(base=target.base, adapter_name=target.adapter_name, memory=estimate_memory(target.base, size))

    return resolve


def public(row: EndpointRow, supervisor: EndpointSupervisor) -> EndpointPublic:
    replicas = supervisor.replicas(row.id)
    return EndpointPublic(
        id=row.id,
        name=row.name,
        display_name=row.display_name,
        model=row.model,
        hardware=row.hardware,
        owner=row.owner,
        state=row.state,
        autoscaling=Autoscaling(min_replicas=row.min_replicas, max_replicas=row.max_replicas),
        inactive_timeout=row.inactive_timeout,
        created_at=iso(row.created_at),
        error=row.error,
        replicas=len(replicas),
        ready_replicas=sum(1 for r in replicas if r.ready.is_set()),
    )


def list_item(row: EndpointRow) -> EndpointListItem:
    return EndpointListItem(id=row.id, name=row.name, model=row.model, owner=row.owner, state=row.state,
                            created_at=iso(row.created_at))  # fmt: skip


def _system_name(owner: str, model: str) -> str:
    """`<owner>/<model's last part>-<8 hex>`: unique, readable, and never a catalog or output name."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rsplit("/", 1)[-1])[:120].strip("-") or "model"
    return f"{owner}/{tail}-{uuid.uuid4().hex[:8]}"


def _check_hardware(options: list[hardware.HardwareOption], hardware_id: str, need: int) -> None:
    option = hardware.find(hardware_id, options)
    if option is None:
        known = ", ".join(o.id for o in options) or "none"
        raise InvalidRequestError(
            f"invalid hardware provided: {hardware_id!r} is not on this host (it has: {known}; GET /v1/hardware "
            "lists them)",
            param="hardware",
        )
    if not hardware.fits(option, need):
        raise InvalidRequestError(
            f"invalid hardware provided: the model needs about {need / GIB:.1f} GiB per replica and {option.id} has "
            f"{option.memory_bytes / GIB:.1f} GiB",
            param="hardware",
        )


def _check_budget(db: Database, settings: Settings, *, need: int, replicas: int, exclude: str | None = None) -> None:
    """Live endpoints' min_replicas x replica memory, plus this one's, must fit the serving budget (the one the
    serverless pool shares: idle serverless servers make room, replicas never do)."""
    with db.session() as s:
        live = [r for r in repo.list_endpoints(s) if r.state in LIVE and r.id != exclude]
    reserved = sum(r.min_replicas * r.replica_bytes for r in live)
    budget = settings.serve_memory_bytes
    if reserved + replicas * need > budget:
        raise InvalidRequestError(
            f"the serving memory budget ({budget / GIB:.1f} GiB, TUNEFORGE_SERVE_MEMORY_BYTES) cannot hold "
            f"{replicas} replica(s) of {need / GIB:.1f} GiB: {reserved / GIB:.1f} GiB is reserved by "
            f"{len(live)} other live endpoint(s)",
            param="autoscaling",
        )


def create(
    db: Database, settings: Settings, supervisor: EndpointSupervisor, resolve: Resolver, *, owner: str,
    body: CreateEndpoint, zone: str | None, options: list[hardware.HardwareOption],
) -> EndpointRow:  # fmt: skip
    low = body.autoscaling.min_replicas or 1
    high = body.autoscaling.max_replicas or low
    if high < low:
        raise InvalidRequestError(f"autoscaling.max_replicas ({high}) is below min_replicas ({low})",
                                  param="autoscaling")  # fmt: skip
    for z in (zone, body.availability_zone):
        if z and z not in hardware.ZONES:
            zones = ", ".join(hardware.ZONES)
            raise InvalidRequestError(f"availability zone {z!r} does not exist here (zones: {zones})",
                                      param="availability_zone")  # fmt: skip
    try:
        served = resolve(owner, body.model)
    except NotFoundError:
        raise NotFoundError(f"model {body.model!r} not found: not in the catalog and not one of your fine-tuned "
                            "models", param="model") from None  # fmt: skip
    _check_hardware(options, body.hardware, served.memory)
    started = body.state != "STOPPED"
    if started:
        _check_budget(db, settings, need=served.memory, replicas=low)
    now = time.time()
    row = EndpointRow(
        id=new_endpoint_id(),
        owner=owner,
        name=_system_name(owner, body.model),
        display_name=body.display_name or body.model.rsplit("/", 1)[-1],
        model=body.model,
        hardware=body.hardware,
        min_replicas=low,
        max_replicas=high,
        state=EndpointState.PENDING if started else EndpointState.STOPPED,
        inactive_timeout=body.inactive_timeout or None,
        replica_bytes=served.memory,
        created_at=now,
        updated_at=now,
    )
    with db.session() as s:
        repo.insert_endpoint(s, row=row, message=f"endpoint {row.name} created for {row.model} on {row.hardware}")
        s.flush()
        s.expunge(row)
    supervisor.wake()
    return row


def update(
    db: Database, settings: Settings, supervisor: EndpointSupervisor, *, owner: str, endpoint_id: str,
    body: UpdateEndpoint,
) -> EndpointRow:  # fmt: skip
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        values: dict[str, object] = {}
        if body.display_name is not None:
            values["display_name"] = body.display_name
        if "inactive_timeout" in body.model_fields_set:
            values["inactive_timeout"] = body.inactive_timeout or None
        low, high = row.min_replicas, row.max_replicas
        if body.autoscaling is not None:  # the CLI may send one of the two: merged with the stored values
            low = body.autoscaling.min_replicas or low
            high = body.autoscaling.max_replicas or high
            if high < low:
                raise InvalidRequestError(f"autoscaling.max_replicas ({high}) is below min_replicas ({low})",
                                          param="autoscaling")  # fmt: skip
            values.update(min_replicas=low, max_replicas=high)
        state = row.state
        replica_bytes = row.replica_bytes
    if (body.state == "STARTED" and state in (EndpointState.STOPPED, EndpointState.ERROR)) or (
        body.autoscaling is not None and state in LIVE and low > 0
    ):
        _check_budget(db, settings, need=replica_bytes, replicas=low, exclude=endpoint_id)
    with db.session() as s:
        if values:
            repo.update_endpoint(s, endpoint_id=endpoint_id, **values)
        if body.state == "STARTED" and state in (EndpointState.STOPPED, EndpointState.ERROR):
            repo.transition(s, endpoint_id=endpoint_id, from_states=(state,), to_state=EndpointState.PENDING,
                            event_type="endpoint_start_requested", message="start requested")  # fmt: skip
        elif body.state == "STOPPED" and state in (*LIVE, EndpointState.ERROR):
            repo.transition(s, endpoint_id=endpoint_id, from_states=(state,), to_state=EndpointState.STOPPING,
                            event_type="endpoint_stop_requested", message="stop requested")  # fmt: skip
    supervisor.wake()
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        s.expunge(row)
    return row


def delete(db: Database, supervisor: EndpointSupervisor, *, owner: str, endpoint_id: str) -> None:
    """Forget the endpoint; its replicas stop at the supervisor's next tick (woken now)."""
    with db.session() as s:
        repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        repo.delete_endpoint(s, endpoint_id=endpoint_id)
    supervisor.wake()


def _adapter_of(row: EndpointRow, model_id: str) -> str:
    """The adapter model of `<endpoint name>:<adapter model>`, checked to name this endpoint."""
    name, sep, adapter = model_id.partition(":")
    if not sep or name != row.name or not adapter:
        raise InvalidRequestError(
            f"model_id must be '<endpoint name>:<adapter model>' with this endpoint's name, e.g. "
            f"'{row.name}:<your LoRA output>'; got {model_id!r}",
            param="model_id",
        )
    return adapter


def adapter_ids(db: Database, *, owner: str, endpoint_id: str) -> tuple[EndpointRow, list[str]]:
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        models = [a.model for a in repo.list_adapters(s, endpoint_id=endpoint_id)]
        s.expunge(row)
    return row, models


def add_adapter(db: Database, resolve: Resolver, *, owner: str, endpoint_id: str, model_id: str) -> str:
    """Serve one more LoRA output of the endpoint's base model on its replicas, as `model_id`."""
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        s.expunge(row)
    adapter = _adapter_of(row, model_id)
    try:
        served = resolve(owner, adapter)
    except NotFoundError:
        raise NotFoundError(f"model {adapter!r} not found: not one of your fine-tuned models",
                            param="model_id") from None  # fmt: skip
    own = resolve(owner, row.model)
    if served.adapter_name is None:
        raise InvalidRequestError(f"model {adapter!r} is not a LoRA adapter: a base model or a full fine-tune needs an "
                                  "endpoint of its own", param="model_id")  # fmt: skip
    if served.base != own.base:
        raise InvalidRequestError(f"adapter {adapter!r} was trained on {served.base.name}; this endpoint serves "
                                  f"{own.base.name}", param="model_id")  # fmt: skip
    with db.session() as s:
        repo.add_adapter(s, endpoint_id=endpoint_id, model=adapter)
    return model_id


def remove_adapter(db: Database, *, owner: str, endpoint_id: str, model_id: str) -> bool:
    with db.session() as s:
        row = repo.get_endpoint(s, endpoint_id=endpoint_id, owner=owner)
        adapter = _adapter_of(row, model_id)
        if not repo.remove_adapter(s, endpoint_id=endpoint_id, model=adapter):
            raise NotFoundError(f"adapter {adapter!r} is not on endpoint {row.name}", param="model_id")
    return True
