"""BlobStore over fsspec: a local folder (default), `s3://bucket/prefix`, or `memory://` for tests.

On a local folder (and in memory) a write goes to a temporary name and is renamed into place on commit; on object
stores a single PUT (or a multipart upload that is only completed on close) is already atomic.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import uuid
from typing import Any, BinaryIO, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tuneforge.errors import NotFoundError, StorageError
from tuneforge.storage.direct import DirectUploads, S3DirectUploads

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs"}
_S3 = {"s3", "s3a"}
# s3fs reads and writes in blocks of this size (its default is 50 MiB): the memory one open blob holds.
S3_BLOCK_BYTES = 8 << 20


class _FsspecWriter:
    def __init__(self, store: FsspecBlobStore, key: str) -> None:
        self._store = store
        self._final = store._path(key)
        self._local = not store.atomic_puts
        if self._local:
            self._target = store._path(f".tmp/{uuid.uuid4().hex}")
            store.fs.makedirs(store.fs._parent(self._target), exist_ok=True)
        else:
            self._target = self._final
        self._fh: Any = store.fs.open(self._target, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> None:
        if self._done:
            return
        self._fh.close()
        if self._local:
            self._store.fs.makedirs(self._store.fs._parent(self._final), exist_ok=True)
            self._store.fs.mv(self._target, self._final)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._local:
            with contextlib.suppress(Exception):
                self._fh.close()
            with contextlib.suppress(FileNotFoundError):
                self._store.fs.rm(self._target)
        else:
            discard = getattr(self._fh, "discard", None)
            with contextlib.suppress(Exception):
                if discard is not None:
                    discard()
                else:
                    self._fh.close()
                    self._store.fs.rm(self._target)

    def touch(self) -> None:
        # Only a local folder writes aside (in memory the sweep goes by creation time; object stores have no .tmp).
        if self._local and not self._done and self._store.is_local:
            with contextlib.suppress(OSError):
                os.utime(self._target)

    def __enter__(self) -> _FsspecWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class FsspecBlobStore:
    """A BlobStore rooted at an fsspec URL."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url
        s3 = fsspec.core.split_protocol(url)[0] in _S3
        if s3:
            # Endpoint, credentials and region come from the standard AWS settings (AWS_ENDPOINT_URL, ...).
            storage_options.setdefault("default_block_size", S3_BLOCK_BYTES)
            storage_options.setdefault("config_kwargs", {"signature_version": "s3v4"})
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.fs: Any = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        # Object stores make a PUT visible only when it completes; elsewhere write aside, then rename.
        self.atomic_puts = bool(protocols & _OBJECT_STORES)
        # Presigned URLs for upload bytes that bypass the API server (None: the server receives them itself).
        self.direct: DirectUploads | None = S3DirectUploads(fs, self.root) if s3 else None
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"invalid blob key {key!r}")
        return f"{self.root}/{key}"

    def writer(self, key: str) -> _FsspecWriter:
        return _FsspecWriter(self, key)

    def open(self, key: str) -> BinaryIO:
        try:
            return cast(BinaryIO, self.fs.open(self._path(key), "rb"))
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {key!r} not found") from exc

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {key!r} not found") from exc

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if self.fs.exists(path):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix.rstrip("/"))
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        strip = len(self.root) + 1
        return sorted(p[strip:] if p.startswith(self.root) else p for p in found)

    def sweep_temporary(self, older_than_s: float) -> int:
        tmp = f"{self.root}/.tmp"
        try:
            entries = self.fs.ls(tmp, detail=True)
        except FileNotFoundError:
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for info in entries:
            stamp = info.get("mtime") or info.get("created") or info.get("LastModified")
            if isinstance(stamp, datetime.datetime):
                stamp = stamp.timestamp()
            if stamp is not None and float(stamp) < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(info["name"])
                removed += 1
        return removed

    def local_path(self, key: str) -> str | None:
        return self._path(key) if self.is_local else None
