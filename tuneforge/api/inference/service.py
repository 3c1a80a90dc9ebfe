"""Which weights a request's `model` means, and where they are served.

A catalog model is served by the pool's model server of that model. A LoRA output (a completed job's output name
or id, or `ft-…:STEP` for an intermediate checkpoint) is an adapter on its base model's server, loaded there on
first use under the output's name. A full fine-tune is a model of its own. Only the caller's outputs are found:
another owner's are "not found", as everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneforge.catalog.cache import model_folder
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.catalog.registry import Catalog
from tuneforge.catalog.source import ModelSource
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.jobs import references
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store import jobs as jobs_repo


@dataclass(frozen=True)
class Target:
    """Where a request goes: the base model server's source, and the adapter (if any) to name there."""

    public_name: str
    base: ModelSource
    adapter_name: str | None = None
    adapter_prefix: str | None = None


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
