"""The catalog as a FastAPI dependency (belongs beside the others in api/deps.py once integrated)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tuneforge.catalog.registry import Catalog


def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
