"""Routes of the files API (contract section 1): parse, call the service, shape the answer."""

from __future__ import annotations

import hashlib
from typing import Annotated
from urllib.parse import quote

from fastapi import Form, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuneforge.api.deps import BlobsDep, DbDep, PrincipalDep, SettingsDep
from tuneforge.api.files import service
from tuneforge.api.files.schemas import (
    FileDeleted,
    FileList,
    FilePublic,
    MultipartAbort,
    MultipartComplete,
    MultipartInitiate,
    MultipartInitiated,
    MultipartPartURL,
)
from tuneforge.api.files.signing import signed_query, verify
from tuneforge.api.responses import binary, errors
from tuneforge.api.routing import api_router
from tuneforge.errors import InvalidRequestError

router = api_router(prefix="/files", tags=["files"])
uploads = api_router(prefix="/uploads", tags=["uploads"], responses=errors(403, 409, 413))


def _base_url(request: Request, public_url: str) -> str:
    return (public_url or str(request.base_url)).rstrip("/")


def _secret(request: Request) -> bytes:
    secret: bytes = request.app.state.upload_secret
    return secret


@router.post("", status_code=302, response_class=Response, responses=errors(409))
def create_file(
    request: Request,
    principal: PrincipalDep,
    db: DbDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    purpose: Annotated[str, Form()],
    file_name: Annotated[str, Form()],
    file_type: Annotated[str, Form()],
    checksum: Annotated[str, Form()],
) -> Response:
    """Open a single-PUT upload: answers 302 with the signed upload URL in `Location` (with storage on S3, the
    bucket's own presigned PUT, so the bytes bypass this server)."""
    direct = service.direct_store(blobs, settings)
    row = service.open_single_upload(
        db,
        settings,
        owner=principal.owner,
        purpose=purpose,
        file_name=file_name,
        file_type=file_type,
        checksum=checksum,
        direct=direct is not None,
    )
    if direct is not None:
        location = direct.put_url(service.staging_key(row.id), settings.upload_url_ttl_s)
    else:
        query = signed_query(_secret(request), row.id, 0, settings.upload_url_ttl_s, key_id=principal.key_id)
        location = f"{_base_url(request, settings.public_url)}/uploads/{row.id}?{query}"
    return Response(status_code=302, headers={"Location": location, "X-Together-File-Id": row.id})


@uploads.put("/{file_id}", response_class=JSONResponse)
async def put_file_content(
    file_id: str, request: Request, expires: int, kid: str, sig: str, db: DbDep, blobs: BlobsDep,
    settings: SettingsDep,
) -> JSONResponse:  # fmt: skip
    """Receive the bytes of a single-PUT upload, streamed and checked against the declared SHA-256."""
    verify(db, _secret(request), file_id, 0, expires, sig, kid)
    row, intake = service.begin_single_put(db, settings, file_id=file_id)
    sha = hashlib.sha256()
    try:
        declared = _declared_length(request, intake)
        writer = blobs.writer(service.blob_key(file_id))
        try:
            async with service.kept_active(db, settings, row=row, intake=intake, writer=writer, single=True):
                size = await service.receive_body(request.stream(), writer, intake=intake, hashers=[sha])
            service.finish_single_upload(db, row=row, size=size, digest=sha.hexdigest(), declared=declared)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    except BaseException:
        service.put_failed(db, file_id=file_id, single=True)
        raise
    service.mark_uploaded(db, blobs, file_id=file_id, size=size)
    return JSONResponse({"id": file_id, "bytes": size, "status": "uploaded"}, status_code=200)


@uploads.put("/{file_id}/parts/{part_number}", response_class=JSONResponse)
async def put_file_part(
    file_id: str,
    part_number: int,
    request: Request,
    expires: int,
    kid: str,
    sig: str,
    db: DbDep,
    blobs: BlobsDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Receive one part of a multipart upload; answers with its MD5 as the ETag."""
    verify(db, _secret(request), file_id, part_number, expires, sig, kid)
    row, intake = service.begin_part_put(db, blobs, file_id=file_id, part_number=part_number)
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        declared = _declared_length(request, intake)
        writer = blobs.writer(service.part_key(file_id, part_number))
        try:
            async with service.kept_active(db, settings, row=row, intake=intake, writer=writer, single=False):
                size = await service.receive_body(request.stream(), writer, intake=intake, hashers=[md5])
            if declared is not None and size != declared:
                raise InvalidRequestError(f"part {part_number} truncated: received {size} of {declared} bytes")
            if size == 0:
                raise InvalidRequestError(f"part {part_number} is empty")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    except BaseException:
        service.put_failed(db, file_id=file_id, single=False)
        raise
    service.part_stored(db, blobs, file_id=file_id)
    etag = md5.hexdigest()
    return JSONResponse({"part_number": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


def _declared_length(request: Request, intake: service.Intake) -> int | None:
    """The body's declared length, refused before a byte of it is read when it is over the PUT's limit."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        declared = int(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"Content-Length {raw!r} is not a number") from exc
    if declared > intake.limit:
        raise intake.too_large(declared)
    return declared


@router.post("/{file_id}/preprocess", response_model=FilePublic, response_model_by_alias=True)
def preprocess_file(
    request: Request, file_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep, settings: SettingsDep
) -> FilePublic:
    """Finalise an uploaded file and queue the server's own dataset check."""
    row, changed = service.preprocess(db, blobs, settings, file_id=file_id, owner=principal.owner)
    if changed:
        request.app.state.processor.submit(file_id)
    return service.to_public(row)


@router.post("/multipart/initiate", response_model=MultipartInitiated, responses=errors(409))
def initiate_multipart_upload(
    request: Request, body: MultipartInitiate, principal: PrincipalDep, db: DbDep, blobs: BlobsDep,
    settings: SettingsDep,
) -> MultipartInitiated:  # fmt: skip
    """Open a multipart upload: one signed URL per part (with storage on S3, the bucket's own presigned part
    PUTs, answered with the part's ETag by the bucket)."""
    direct = service.direct_store(blobs, settings)
    row = service.open_multipart_upload(
        db,
        settings,
        owner=principal.owner,
        purpose=body.purpose,
        file_name=body.file_name,
        file_type=body.file_type,
        checksum=body.checksum,
        file_size=body.file_size,
        num_parts=body.num_parts,
        direct=direct,
    )
    base = _base_url(request, settings.public_url)
    secret, ttl = _secret(request), settings.upload_url_ttl_s

    def part_url(n: int) -> str:
        if direct is not None and row.storage_upload_id is not None:
            return direct.part_url(service.blob_key(row.id), row.storage_upload_id, n, ttl)
        return f"{base}/uploads/{row.id}/parts/{n}?{signed_query(secret, row.id, n, ttl, key_id=principal.key_id)}"

    parts = [MultipartPartURL(PartNumber=n, URL=part_url(n)) for n in range(1, body.num_parts + 1)]
    return MultipartInitiated(upload_id=row.upload_id or "", file_id=row.id, parts=parts)


@router.post("/multipart/complete", response_model=FilePublic, response_model_by_alias=True, responses=errors(404, 409))
def complete_multipart_upload(
    request: Request, body: MultipartComplete, principal: PrincipalDep, db: DbDep, blobs: BlobsDep,
    settings: SettingsDep,
) -> FilePublic:  # fmt: skip
    row = service.complete_multipart(
        db,
        blobs,
        owner=principal.owner,
        file_id=body.file_id,
        upload_id=body.upload_id,
        parts=[(p.part_number, p.etag) for p in body.parts],
        idle_s=settings.stale_upload_s,
    )
    request.app.state.processor.submit(row.id)
    return service.to_public(row)


@router.post("/multipart/abort", responses=errors(404, 409))
def abort_multipart_upload(
    body: MultipartAbort, principal: PrincipalDep, db: DbDep, blobs: BlobsDep
) -> dict[str, object]:
    service.abort_multipart(db, blobs, owner=principal.owner, file_id=body.file_id, upload_id=body.upload_id)
    return {"file_id": body.file_id, "aborted": True}


@router.get("", response_model=FileList, response_model_by_alias=True)
def list_files(principal: PrincipalDep, db: DbDep) -> FileList:
    return FileList(data=service.list_files(db, owner=principal.owner))


@router.get("/{file_id}", response_model=FilePublic, response_model_by_alias=True)
def retrieve_file(file_id: str, principal: PrincipalDep, db: DbDep) -> FilePublic:
    return service.to_public(service.retrieve_file(db, owner=principal.owner, file_id=file_id))


@router.get(
    "/{file_id}/content", response_class=Response, responses=binary("application/octet-stream", "The file's bytes")
)
def retrieve_file_content(file_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep) -> StreamingResponse:
    row = service.retrieve_file(db, owner=principal.owner, file_id=file_id)
    return StreamingResponse(
        service.stream_content(blobs, file_id),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}",
        },
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=errors(409))
def delete_file(file_id: str, principal: PrincipalDep, db: DbDep, blobs: BlobsDep) -> FileDeleted:
    service.delete_file(db, blobs, owner=principal.owner, file_id=file_id)
    return FileDeleted(id=file_id, deleted=True)
