"""`GET /models` (api-contract 4.3): the catalog's models and the caller's fine-tuned outputs.

The Together SDK wants a bare JSON array, openai an `{"object": "list", "data": [...]}` envelope: the array by
default, the envelope for a `User-Agent` starting `OpenAI/` or `?format=openai`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Header, Query
from fastapi.responses import JSONResponse

from tuneforge.api.deps import DbDep, PrincipalDep, SettingsDep
from tuneforge.api.fine_tunes import service
from tuneforge.api.fine_tunes.deps import CatalogDep
from tuneforge.api.models.schemas import ModelList, ModelPublic, Pricing
from tuneforge.api.routing import api_router
from tuneforge.catalog.cache import model_folder
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import NotFoundError
from tuneforge.settings import Settings
from tuneforge.store import Database
from tuneforge.store.tables import JobRow

router = api_router(prefix="/models", tags=["models"])

# Together prices are dollars per million tokens.
PER_MILLION = 1_000_000


def _catalog_item(entry: ModelEntry, price_per_token: float, cache: Path) -> ModelPublic:
    org = entry.name.split("/", 1)[0] if "/" in entry.name else "tuneforge"
    return ModelPublic(
        downloaded=model_folder(cache, entry) is not None,
        parameter_count=entry.params,
        supports_vision=entry.limits.supports_vision,
        id=entry.name,
        created=0,
        owned_by=org,
        display_name=entry.name.rsplit("/", 1)[-1],
        organization=org,
        context_length=entry.limits.max_seq_length,
        pricing=Pricing(finetune=price_per_token * PER_MILLION),
    )


def _output_item(job: JobRow) -> ModelPublic:
    request: dict[str, Any] = (job.params or {}).get("request") or {}
    seq = request.get("max_seq_length")
    return ModelPublic(
        id=job.output_name,
        created=int(job.finished_at or job.created_at),
        owned_by=job.owner,
        display_name=job.output_name.rsplit("/", 1)[-1],
        organization=job.owner,
        context_length=seq if isinstance(seq, int) else None,
        pricing=Pricing(),
    )


def _items(db: Database, catalog: Catalog, settings: Settings, owner: str) -> list[ModelPublic]:
    items = [_catalog_item(e, settings.price_per_token, settings.home / "models") for e in catalog.list()]
    items += [_output_item(job) for job in service.completed_jobs(db, owner=owner)]
    return items


@router.get("", response_model=None)
def list_models(
    principal: PrincipalDep,
    db: DbDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    user_agent: Annotated[str, Header()] = "",
    response_format: Annotated[str | None, Query(alias="format")] = None,
    dedicated: bool | None = None,
) -> JSONResponse:
    """The models a caller can fine-tune or chat with (`dedicated` is accepted and changes nothing here)."""
    items = _items(db, catalog, settings, principal.owner)
    if response_format == "openai" or user_agent.startswith("OpenAI/"):
        return JSONResponse(ModelList(data=items).model_dump())
    return JSONResponse([m.model_dump() for m in items])


@router.get("/{model_id:path}", response_model=ModelPublic)
def retrieve_model(
    model_id: str, principal: PrincipalDep, db: DbDep, catalog: CatalogDep, settings: SettingsDep
) -> ModelPublic:
    for item in _items(db, catalog, settings, principal.owner):
        if item.id == model_id:
            return item
    raise NotFoundError(f"model {model_id!r} not found", param="model")
