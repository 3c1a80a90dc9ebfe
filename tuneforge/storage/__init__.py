"""Bytes by key, behind the BlobStore protocol; `open_blob_store(url)` picks the backend from the URL."""

from __future__ import annotations

from tuneforge.storage.base import BlobStore, BlobWriter, iter_chunks
from tuneforge.storage.fsspec_store import FsspecBlobStore


def open_blob_store(url: str) -> BlobStore:
    """A BlobStore for a local folder, `file://`, `s3://bucket/prefix` (needs s3fs) or `memory://`."""
    return FsspecBlobStore(url)


__all__ = ["BlobStore", "BlobWriter", "FsspecBlobStore", "iter_chunks", "open_blob_store"]
