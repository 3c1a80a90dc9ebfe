"""Routes of the fine-tuning API (contract section 3): parse, call the service, shape the answer."""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuneforge.api.deps import BlobsDep, DbDep, PrincipalDep, SettingsDep
from tuneforge.api.errors import error_body
from tuneforge.api.files.signing import signed_query, verify
from tuneforge.api.fine_tunes import archives, create, preview, service
from tuneforge.api.fine_tunes.deps import CatalogDep
from tuneforge.api.fine_tunes.schemas import (
    CheckpointList,
    EstimatePricePublic,
    EstimatePriceRequest,
    FineTuneCreate,
    FineTuneDeleted,
    FineTuneEventList,
    FineTuneList,
    FineTunePublic,
    MetricList,
    ModelLimitsPublic,
    PreviewPublic,
    PreviewRequest,
    TokenizedDatasetPublic,
)
from tuneforge.api.responses import binary, errors
from tuneforge.api.routing import api_router
from tuneforge.api.timestamps import iso

router = api_router(prefix="/fine-tunes", tags=["fine-tuning"])
downloads = api_router(prefix="/finetune", tags=["fine-tuning"])
# Fetched with no API key (the URL's signature authorises it), so it lives outside `/v1`, where every route needs
# a key; beside `/uploads`, the other signed routes.
signed = api_router(prefix="/downloads/fine-tunes", tags=["fine-tuning"], responses=errors(403))

# The signature of a tokenized-dataset URL covers the job id and this "part", so it can never pass for an
# upload URL (those sign a file id and a part >= 0).
TOKENIZED_PART = -1


def _worker(request: Request) -> service.WorkerLike | None:
    worker: service.WorkerLike | None = getattr(request.app.state, "worker", None)
    return worker


@router.get("/models/limits", response_model=ModelLimitsPublic, responses=errors(404))
def model_limits(
    principal: PrincipalDep, db: DbDep, catalog: CatalogDep, model_name: Annotated[str, Query()] = ""
) -> ModelLimitsPublic:
    """Limits of a catalog model, or of the base model of one of the caller's jobs or outputs."""
    return service.model_limits(db, catalog, owner=principal.owner, model_name=model_name)


@router.post(
    "/estimate-price", response_model=EstimatePricePublic, response_model_exclude_none=True, responses=errors(404)
)
def estimate_price(
    body: EstimatePriceRequest,
    principal: PrincipalDep,
    db: DbDep,
    blobs: BlobsDep,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> EstimatePricePublic:
    return service.estimate_price(db, blobs, catalog, settings, owner=principal.owner, body=body)


@router.post("/preview", response_model=PreviewPublic, responses=errors(404, 409))
def preview_fine_tune_data(
    body: PreviewRequest,
    principal: PrincipalDep,
    db: DbDep,
    blobs: BlobsDep,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> PreviewPublic:
    """The first `top_k` rows of a training file, tokenized and masked as a training run on the model does it."""
    return preview.preview(db, blobs, catalog, settings, owner=principal.owner, body=body)


@router.post("", response_model=FineTunePublic, response_model_by_alias=True, responses=errors(404))
def create_fine_tune(
    request: Request,
    body: FineTuneCreate,
    principal: PrincipalDep,
    db: DbDep,
    blobs: BlobsDep,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> FineTunePublic:
    """Check the request against the model's limits and queue the job (an identical retry gets the same job)."""
    row, new = create.create_job(db, blobs, catalog, settings, owner=principal.owner, body=body)
    worker = _worker(request)
    if new and worker is not None:
        worker.wake()
    return service.to_public(db, settings, row)


@router.get("", response_model=FineTuneList, response_model_by_alias=True)
def list_fine_tunes(principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> FineTuneList:
    return service.list_fine_tunes(db, settings, owner=principal.owner)


@router.get("/{job_id}", response_model=FineTunePublic, response_model_by_alias=True)
def retrieve_fine_tune(
    job_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep, settings: SettingsDep
) -> FineTunePublic:
    return service.retrieve_fine_tune(db, blobs, settings, owner=principal.owner, job_id=job_id)


@router.post("/{job_id}/cancel", response_model=FineTunePublic, response_model_by_alias=True)
def cancel_fine_tune(
    request: Request, job_id: str, principal: PrincipalDep, db: DbDep, settings: SettingsDep
) -> FineTunePublic:
    return service.cancel_fine_tune(db, settings, owner=principal.owner, job_id=job_id, worker=_worker(request))


@router.delete("/{job_id}", response_model=FineTuneDeleted, responses=errors(409))
def delete_fine_tune(
    job_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep, force: bool | None = None
) -> FineTuneDeleted:
    """Delete a finished job and its weights (`force` is accepted for old clients and changes nothing)."""
    return service.delete_fine_tune(db, blobs, owner=principal.owner, job_id=job_id)


@router.get("/{job_id}/events", response_model=FineTuneEventList)
def list_fine_tune_events(job_id: str, principal: PrincipalDep, db: DbDep) -> FineTuneEventList:
    return service.list_events(db, owner=principal.owner, job_id=job_id)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tune_checkpoints(job_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep) -> CheckpointList:
    return service.list_checkpoints(db, blobs, owner=principal.owner, job_id=job_id)


@router.get("/{job_id}/metrics", response_model=MetricList)
def list_fine_tune_metrics(
    job_id: str,
    principal: PrincipalDep,
    db: DbDep,
    global_step_from: int | None = None,
    global_step_to: int | None = None,
    logged_at_from: str | None = None,
    logged_at_to: str | None = None,
    resolution: int | None = None,
) -> MetricList:
    return service.list_metrics(
        db,
        owner=principal.owner,
        job_id=job_id,
        global_step_from=global_step_from,
        global_step_to=global_step_to,
        logged_at_from=logged_at_from,
        logged_at_to=logged_at_to,
        resolution=resolution,
    )


@router.get("/{job_id}/download-tokenized-dataset", response_model=TokenizedDatasetPublic)
def retrieve_tokenized_dataset(
    request: Request, job_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep, settings: SettingsDep
) -> TokenizedDatasetPublic:
    """A signed URL to the tokenized training set: the CLI fetches it without any API key."""
    _, size = service.tokenized_dataset(db, blobs, owner=principal.owner, job_id=job_id)
    ttl = settings.upload_url_ttl_s
    query = signed_query(request.app.state.upload_secret, job_id, TOKENIZED_PART, ttl, key_id=principal.key_id)
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    return TokenizedDatasetPublic(
        url=f"{base}/downloads/fine-tunes/{quote(job_id)}/tokenized-dataset?{query}",
        filename=f"{job_id}-tokenized.parquet",
        size=size,
        content_type="application/vnd.apache.parquet",
        expires_at=iso(time.time() + ttl) or "",
    )


@signed.get(
    "/{job_id}/tokenized-dataset",
    response_class=Response,
    responses=binary("application/vnd.apache.parquet", "The tokenized training set, as Parquet"),
)
def download_tokenized_dataset(
    request: Request, job_id: str, expires: int, kid: str, sig: str, db: DbDep, blobs: BlobsDep
) -> StreamingResponse:
    """The signed fetch of a tokenized training set (no API key: the URL authorises it, while its key lives)."""
    verify(db, request.app.state.upload_secret, job_id, TOKENIZED_PART, expires, sig, kid)
    key, size = service.tokenized_dataset(db, blobs, owner=None, job_id=job_id)
    return StreamingResponse(
        archives.iter_bytes(blobs, key, 0, size - 1),
        media_type="application/vnd.apache.parquet",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{job_id}-tokenized.parquet"',
        },
    )


@downloads.get(
    "/download",
    response_class=Response,
    responses={
        **binary("application/x-tar", "The weights as a .tar.gz archive"),
        **binary("application/x-tar", "The requested byte range of the archive", status=206),
        **errors(404, 416),
    },
)
def download_fine_tune(
    request: Request,
    principal: PrincipalDep,
    db: DbDep,
    blobs: BlobsDep,
    ft_id: str,
    checkpoint: str | None = None,
    checkpoint_step: int | None = None,
    range_header: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    """A `.tar.gz` of the job's final weights or of one checkpoint, with byte ranges for resumed downloads."""
    job, target = service.download_target(
        db, owner=principal.owner, ft_id=ft_id, checkpoint=checkpoint, checkpoint_step=checkpoint_step
    )
    total = archives.ensure_archive(blobs, target)
    step_part = f"-step-{target.step}" if target.intermediate else ""
    name = f"{job.output_name.rsplit('/', 1)[-1]}{step_part}.tar.gz"
    headers: dict[str, Any] = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
    }
    try:
        span = archives.parse_range(range_header, total)
    except archives.RangeNotSatisfiable as exc:
        body = error_body(
            f"range {range_header!r} is outside the archive of {exc.total} bytes", "invalid_request_error"
        )
        return JSONResponse(body, status_code=416, headers={"Content-Range": f"bytes */{exc.total}"})
    start, end = span if span is not None else (0, total - 1)
    headers["Content-Length"] = str(end - start + 1)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{total}"
    return StreamingResponse(
        archives.iter_bytes(blobs, target.archive, start, end),
        status_code=status,
        media_type="application/x-tar",
        headers=headers,
    )
