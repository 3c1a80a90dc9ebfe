"""Weight downloads (api-contract 3.12): which folder a download means, a `.tar.gz` of it built once into the
BlobStore (never served half-built: the BlobWriter only publishes on commit), and byte ranges of it.

Knows the blob layout and HTTP ranges; knows nothing of HTTP responses or the database.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.jobs.references import MissingWeights, training_type_of, weights_at
from tuneforge.storage import BlobStore, BlobWriter
from tuneforge.storage.layout import RESUME_DIR, archive_key
from tuneforge.store.tables import CheckpointRow, JobRow

CHECKPOINTS = ("merged", "adapter", "model_output_path")
CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Target:
    """One downloadable folder: its blob prefix and where its archive is kept."""

    prefix: str
    archive: str
    variant: str
    step: int
    intermediate: bool = False


class RangeNotSatisfiable(Exception):
    """The requested byte range lies outside the archive (answered with 416)."""

    def __init__(self, total: int) -> None:
        super().__init__(f"range not satisfiable: the archive has {total} bytes")
        self.total = total


def choose(job: JobRow, checkpoints: list[CheckpointRow], *, checkpoint: str | None, step: int | None) -> Target:
    """The folder `checkpoint` and `checkpoint_step` name; a step takes precedence (its folder holds what the run
    saved at that step: an adapter for LoRA, the whole model for full training)."""
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise InvalidRequestError(
            f"checkpoint must be one of {', '.join(CHECKPOINTS)} (got {checkpoint!r})", param="checkpoint"
        )
    lora = training_type_of(job) == "lora"
    if not lora and checkpoint == "adapter":
        raise InvalidRequestError(
            f"{job.id} is a full fine-tuning job: it has no adapter; download checkpoint=model_output_path",
            param="checkpoint",
        )
    variant = ("adapter" if checkpoint == "adapter" else "merged") if lora else "model"
    try:
        w = weights_at(job, checkpoints, step=step, final_variant=variant)
    except MissingWeights as exc:
        if exc.unfinished:
            raise InvalidRequestError(f"{exc}, or wait until it is completed", param="ft_id") from exc
        raise NotFoundError(str(exc), param="checkpoint_step") from exc
    if w.intermediate:
        saved = "adapter" if lora else "model"  # what the run saved at that step
        return Target(prefix=w.prefix, archive=archive_key(job.id, f"step-{saved}", w.step), variant=saved,
                      step=w.step, intermediate=True)  # fmt: skip
    return Target(prefix=w.prefix, archive=archive_key(job.id, variant, 0), variant=variant, step=w.step)


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class _WriterFile:
    """A BlobWriter seen as a write-only file, for gzip and tarfile."""

    def __init__(self, writer: BlobWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> int:
        self._writer.write(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def ensure_archive(blobs: BlobStore, target: Target) -> int:
    """Build the target's archive unless it exists; returns its size. One build per archive at a time."""
    if blobs.exists(target.archive):
        return blobs.size(target.archive)
    with _lock(target.archive):
        if blobs.exists(target.archive):
            return blobs.size(target.archive)
        root = target.prefix.rstrip("/") + "/"
        keys = [k for k in blobs.list(target.prefix) if k.startswith(root)]
        keys = [k for k in keys if k[len(root) :].split("/", 1)[0] != RESUME_DIR]
        if not keys:
            raise NotFoundError(f"no {target.variant} weights are stored for this job", param="checkpoint")
        writer = blobs.writer(target.archive)
        try:
            sink = _WriterFile(writer)
            # Level 1: weights hardly compress, and a fast build keeps the first request short.
            with (
                gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for key in keys:
                    info = tarfile.TarInfo(key[len(root) :])
                    info.size = blobs.size(key)
                    info.mode = 0o644
                    with blobs.open(key) as fh:
                        tar.addfile(info, fh)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return blobs.size(target.archive)


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as an inclusive (start, end); None for no or an unusable header
    (several ranges: the whole archive is sent). RangeNotSatisfiable when it lies outside the archive."""
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None or (not m[1] and not m[2]):
        return None
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]), total - 1) if m[2] else total - 1
        if start >= total or (m[2] and int(m[2]) < start):
            raise RangeNotSatisfiable(total)
        return start, end
    suffix = int(m[2])
    if suffix == 0 or total == 0:
        raise RangeNotSatisfiable(total)
    return max(0, total - suffix), total - 1


def iter_bytes(blobs: BlobStore, key: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes start..end (inclusive) of a blob, in chunks."""
    left = end - start + 1
    with blobs.open(key) as fh:
        if start:
            fh.seek(start)
        while left > 0:
            block = fh.read(min(CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block
