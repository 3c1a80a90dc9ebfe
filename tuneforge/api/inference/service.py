"""Which weights a request's `model` means, and where they are served.

A catalog model is served by the pool's model server of that model. A LoRA output (a completed job's output name
or id, or `ft-…:STEP` for an intermediate checkpoint) is an adapter on its base model's server, loaded there on
first use under the output's name. A full fine-tune is a model of its own. Only the caller's outputs are found:
another owner's are "not found", as everywhere.

`resolve` reads the database on every request (ownership, deletion); what follows from an immutable prefix or source
(an adapter's checked local folder, a model's weight size) is worked out once and kept in the app's `ProxyCache`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from tuneforge.catalog.cache import model_folder
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.catalog.registry import Catalog
from tuneforge.catalog.source import ModelSource
from tuneforge.endpoints.supervisor import unavailable_message
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.jobs import references
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store import endpoints as endpoints_repo
from tuneforge.store import jobs as jobs_repo
from tuneforge.store.endpoint_states import LIVE

# How many entries each of the proxy's caches keeps: far more adapters and models than are served at once, and a few
# hundred KiB at most.
CACHE_ENTRIES = 4096

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Target:
    """Where a request goes: the base model server's source, and the adapter (if any) to name there."""

    public_name: str
    base: ModelSource
    adapter_name: str | None = None
    adapter_prefix: str | None = None
    endpoint_id: str | None = None  # a dedicated endpoint's replicas serve it, not the serverless pool


def resolve_with_endpoints(db: Database, catalog: Catalog, *, owner: str, model: str) -> Target:
    """`resolve`, where `model` may also be the name of one of the caller's dedicated endpoints, or
    `<endpoint name>:<adapter model>` for an adapter added to one: then the endpoint's replicas serve it (a stopped
    endpoint is a 400 that says how to start it)."""
    adapter: str | None = None
    with db.session() as s:
        endpoint = endpoints_repo.find_by_name(s, name=model, owner=owner)
        name, sep, rest = model.partition(":")
        if endpoint is None and sep:  # `<endpoint name>:<adapter model>`, an adapter added to one of the caller's
            endpoint = endpoints_repo.find_by_name(s, name=name, owner=owner)
            if endpoint is not None and not endpoints_repo.has_adapter(s, endpoint_id=endpoint.id, model=rest):
                raise NotFoundError(f"adapter {rest!r} is not on endpoint {name} (POST /v1/endpoints/"
                                    f"{endpoint.id}/adapters adds it)", param="model")  # fmt: skip
            adapter = rest
        if endpoint is not None:
            s.expunge(endpoint)
    if endpoint is None:
        return resolve(db, catalog, owner=owner, model=model)
    if endpoint.state not in LIVE:  # STOPPING counts as stopped for a new request
        raise InvalidRequestError(unavailable_message(endpoint), param="model")
    target = resolve(db, catalog, owner=endpoint.owner, model=adapter or endpoint.model)
    return replace(target, public_name=model, endpoint_id=endpoint.id)


def _source(entry: ModelEntry) -> ModelSource:
    return ModelSource(name=entry.name, source_kind=entry.source_kind, source=entry.source, revision=entry.revision)


def resolve(db: Database, catalog: Catalog, *, owner: str, model: str) -> Target:
    entry = catalog.find(model)
    if entry is not None:
        return Target(public_name=model, base=_source(entry))
    name, step = references.split_step(model)
    with db.session() as s:
        job = references.find_owned_job(s, owner=owner, name=name)
        if job is None:
            raise NotFoundError(
                f"model {model!r} not found: it is neither in the model catalog nor one of your fine-tuned models "
                "(GET /v1/models lists them)",
                param="model",
            )
        checkpoints = jobs_repo.list_checkpoints(s, job_id=job.id)
        lora = references.training_type_of(job) == "lora"
        try:
            weights = references.weights_at(job, checkpoints, step=step, final_variant="adapter" if lora else "model")
        except references.MissingWeights as exc:
            raise InvalidRequestError(f"model {model!r} cannot be served yet: {exc}", param="model") from None
        base = catalog.find(job.model)
    served_as = job.id if step is None else f"{job.id}:{step}"
    if not lora:
        return Target(public_name=model, base=ModelSource(name=served_as, source_kind="output", source=weights.prefix))
    if base is None:
        raise NotFoundError(f"model {job.model!r}, the base of {model!r}, is not in the catalog any more",
                            param="model")  # fmt: skip
    return Target(public_name=model, base=_source(base), adapter_name=served_as, adapter_prefix=weights.prefix)


def weights_bytes(blobs: BlobStore, cache_dir: Path, catalog: Catalog, source: ModelSource) -> int | None:
    """The size of a model's weight files, where it is known without preparing the model (for the pool's memory
    budget): a fine-tuned output's stored files, or a catalog model's prepared folder."""
    if source.source_kind == "output":
        keys = [k for k in blobs.list(source.source) if k.endswith((".safetensors", ".bin"))]
        return sum(blobs.size(k) for k in keys) or None
    entry = catalog.find(source.name)
    folder = model_folder(cache_dir, entry) if entry is not None else None
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def adapter_folder(blobs: BlobStore, cache_dir: Path, target: Target) -> Path:
    """The adapter's files on local disk (downloaded once from the blob store)."""
    assert target.adapter_prefix is not None and target.adapter_name is not None
    source = ModelSource(name=target.adapter_name, source_kind="output", source=target.adapter_prefix)
    return resolve_model_dir(source, cache_dir, blobs=blobs)


class Lru(Generic[K, V]):
    """A small thread-safe map that forgets its least recently used entry beyond `limit` entries."""

    def __init__(self, limit: int = CACHE_ENTRIES) -> None:
        self._limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# An adapter's checked folder is found by what it is made from: its served name, its stored prefix (immutable once
# written: a completed job's output, an intermediate checkpoint's own `step-N` prefix) and the largest rank allowed.
AdapterKey = tuple[str, str, int | None]


@dataclass(frozen=True)
class ProxyCache:
    """What the chat proxy works out once instead of on every request: an adapter's local folder once it passed
    `check_adapter` (a refused one is not kept, so it is checked, and refused, again), and a model's known weight
    size (an unknown size is not kept, so it is looked for again)."""

    adapter_folders: Lru[AdapterKey, Path] = field(default_factory=Lru)
    weight_sizes: Lru[ModelSource, int] = field(default_factory=Lru)
