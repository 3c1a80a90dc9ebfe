"""The catalog itself: the built-in models (with the hosted service's models, `catalog/hosted.py`, unless turned
off) plus those added with `tuneforge models add`, kept as one JSON blob (`catalog/models.json`) in the BlobStore so
that every server and trainer sharing a store sees it.
"""

from __future__ import annotations

import json
import threading

from tuneforge.catalog.entries import BUILTIN, SOURCE_KINDS, ModelEntry
from tuneforge.catalog.hosted import HOSTED
from tuneforge.errors import ConflictError, InvalidRequestError, NotFoundError
from tuneforge.storage import BlobStore

CATALOG_KEY = "catalog/models.json"


class Catalog:
    """Model names -> entries. Reads the blob on each call, so edits by the CLI show up in a running server."""

    def __init__(self, blobs: BlobStore, *, hosted: bool = True) -> None:
        self._blobs = blobs
        self._lock = threading.Lock()
        self._builtin: tuple[ModelEntry, ...] = (*BUILTIN, *(HOSTED if hosted else ()))

    def _added(self) -> dict[str, ModelEntry]:
        if not self._blobs.exists(CATALOG_KEY):
            return {}
        with self._blobs.open(CATALOG_KEY) as fh:
            data = json.loads(fh.read() or b"[]")
        return {d["name"]: ModelEntry.from_json(d) for d in data}

    def _save(self, entries: dict[str, ModelEntry]) -> None:
        payload = json.dumps([e.to_json() for e in entries.values()], indent=2).encode()
        with self._blobs.writer(CATALOG_KEY) as w:
            w.write(payload)

    def list(self) -> list[ModelEntry]:
        merged = {e.name: e for e in self._builtin}
        merged.update(self._added())
        return sorted(merged.values(), key=lambda e: e.name)

    def find(self, name: str) -> ModelEntry | None:
        added = self._added()
        if name in added:
            return added[name]
        return next((e for e in self._builtin if e.name == name), None)

    def get(self, name: str) -> ModelEntry:
        entry = self.find(name)
        if entry is None:
            known = ", ".join(e.name for e in self.list())
            raise NotFoundError(f"model {name!r} not found in the catalog (known: {known})", param="model")
        return entry

    def add(self, entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
        if entry.source_kind not in SOURCE_KINDS:
            raise InvalidRequestError(
                f"source kind {entry.source_kind!r} is not one of {', '.join(SOURCE_KINDS)}", param="source"
            )
        if not entry.name.strip():
            raise InvalidRequestError("a model needs a name", param="name")
        with self._lock:
            added = self._added()
            if not replace and (entry.name in added or any(e.name == entry.name for e in self._builtin)):
                raise ConflictError(f"model {entry.name!r} is already in the catalog", param="name")
            added[entry.name] = entry
            self._save(added)
        return entry

    def remove(self, name: str) -> None:
        with self._lock:
            added = self._added()
            if name not in added:
                if any(e.name == name for e in self._builtin):
                    raise InvalidRequestError(f"model {name!r} is built in and cannot be removed", param="name")
                raise NotFoundError(f"model {name!r} not found in the catalog", param="name")
            del added[name]
            self._save(added)
