"""Direct uploads: presigned URLs that let a client PUT a file's bytes straight into the object store.

With storage on S3 (or an S3-compatible server), the upload URL the together SDK follows is the bucket's own
presigned URL, so the bytes never pass through the API server. The server only opens the upload, and afterwards
moves, measures and verifies what arrived (`api/files/service.py`). A local folder has no such URLs: there the API
server receives the bytes itself (`BlobStore.direct` is None).

Knows keys and the S3 API, nothing about files, owners or the database.
"""

from __future__ import annotations

from typing import Any, Protocol

from tuneforge.errors import InvalidRequestError, NotFoundError, StorageError


class DirectUploads(Protocol):
    """What an object store offers for bytes that bypass the API server."""

    def put_url(self, key: str, ttl_s: int) -> str:
        """A URL that stores one PUT's body under `key`, valid for `ttl_s`, with no other credentials."""
        ...

    def start_multipart(self, key: str) -> str:
        """Open a multipart upload to `key`; returns the store's upload id. Nothing is visible until completed."""
        ...

    def part_url(self, key: str, upload_id: str, part_number: int, ttl_s: int) -> str:
        """A URL for one part's PUT; the store answers it with the part's ETag."""
        ...

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Join the parts (number, ETag) into the object at `key`; the store checks each ETag."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload and its parts; one already gone is not an error."""
        ...

    def move(self, source: str, target: str) -> None:
        """Move an object inside the store (a server-side copy, then the source removed)."""
        ...


class S3DirectUploads:
    """DirectUploads on an s3fs filesystem: its own client presigns and calls the S3 API, so the endpoint,
    credentials and region are the ones the rest of the blob store uses (the standard AWS settings)."""

    def __init__(self, fs: Any, root: str) -> None:
        self._fs = fs
        self._root = root

    def _where(self, key: str) -> dict[str, str]:
        bucket, _, prefix = self._root.partition("/")
        return {"Bucket": bucket, "Key": f"{prefix}/{key}" if prefix else key}

    def _presign(self, method: str, params: dict[str, Any], ttl_s: int) -> str:
        from fsspec.asyn import sync

        # The client is made on first use (inside s3fs's loop); `set_session` is how s3fs makes sure it exists.
        sync(self._fs.loop, self._fs.set_session)
        return str(sync(self._fs.loop, self._fs.s3.generate_presigned_url, method, Params=params, ExpiresIn=ttl_s))

    def _call(self, method: str, **params: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self._fs.call_s3(method, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), str(error.get("Message", exc))
            if code in ("InvalidPart", "InvalidPartOrder", "EntityTooSmall"):
                raise InvalidRequestError(f"the object store refused the parts: {code}: {message}",
                                          param="parts") from exc  # fmt: skip
            if code in ("NoSuchUpload", "NoSuchKey", "404"):
                raise NotFoundError(f"the object store has no such upload or object ({code})") from exc
            raise StorageError(f"object store call {method} failed: {code}: {message}") from exc
        except OSError as exc:  # s3fs turns some errors into FileNotFoundError and friends
            if isinstance(exc, FileNotFoundError):
                raise NotFoundError(f"the object store has no such upload or object: {exc}") from exc
            raise StorageError(f"object store call {method} failed: {exc}") from exc

    def put_url(self, key: str, ttl_s: int) -> str:
        return self._presign("put_object", self._where(key), ttl_s)

    def start_multipart(self, key: str) -> str:
        return str(self._call("create_multipart_upload", **self._where(key))["UploadId"])

    def part_url(self, key: str, upload_id: str, part_number: int, ttl_s: int) -> str:
        params = dict(self._where(key), UploadId=upload_id, PartNumber=part_number)
        return self._presign("upload_part", params, ttl_s)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        listing = {"Parts": [{"PartNumber": n, "ETag": f'"{etag.strip(chr(34))}"'} for n, etag in sorted(parts)]}
        self._call("complete_multipart_upload", **self._where(key), UploadId=upload_id, MultipartUpload=listing)
        self._fs.invalidate_cache()

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort_multipart_upload", **self._where(key), UploadId=upload_id)
        except NotFoundError:
            return

    def move(self, source: str, target: str) -> None:
        src, dst = f"{self._root}/{source}", f"{self._root}/{target}"
        try:
            self._fs.copy(src, dst)  # CopyObject; s3fs copies objects over 5 GB part by part, still inside S3
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {source!r} not found") from exc
        self._fs.rm(src)
        self._fs.invalidate_cache()
