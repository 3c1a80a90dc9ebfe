"""The BlobStore contract: put a stream atomically, open a stream, list, delete.

Knows nothing about files, owners or the database: keys are plain `/`-separated strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol

from tuneforge.storage.direct import DirectUploads


class BlobWriter(Protocol):
    """An in-progress write. Nothing is visible under the key until `commit()`."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def touch(self) -> None:
        """Mark the write as still in progress, so that `sweep_temporary` does not take it for a crashed one."""
        ...

    def __enter__(self) -> BlobWriter: ...

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None: ...


class BlobStore(Protocol):
    """Bytes by key. Writes are atomic: a reader sees the whole blob or none of it."""

    url: str
    direct: DirectUploads | None  # presigned upload URLs, on object stores that have them

    def writer(self, key: str) -> BlobWriter: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def sweep_temporary(self, older_than_s: float) -> int:
        """Remove leftovers of writes that never committed (a crash mid-write), older than the cutoff."""
        ...

    def local_path(self, key: str) -> str | None:
        """A filesystem path to the blob when the store is a local folder, else None."""
        ...


def iter_chunks(stream: BinaryIO, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Read a binary stream in chunks until it ends."""
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return
        yield chunk
