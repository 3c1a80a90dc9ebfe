"""One big JSONL file on several CPUs: line-aligned byte ranges, a `python -c` child per extra range.

Plain child processes (not multiprocessing) re-import no caller `__main__` and copy no lock from a threaded
server. Knows `jsonl.scan` and the `Tally` it returns; nothing of reports or rules.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import msgspec

from tuneforge.data.validation.jsonl import Tally, first_format, scan

log = logging.getLogger("tuneforge.data")
_ROOT = str(Path(__file__).resolve().parents[3])  # the folder holding the tuneforge package
_CHILD = (
    f"import sys; sys.path.insert(0, {_ROOT!r}); "
    "from tuneforge.data.validation.parallel import worker_main; worker_main()"
)


def free_cpus() -> int:
    """CPUs this process may use minus the load already on them (1-minute average), at least 1.

    A second process only pays off on an idle CPU: on a busy machine it competes with the first.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


class _Job(msgspec.Struct):
    path: str
    start: int
    end: int
    purpose: str
    max_errors: int
    max_line_bytes: int
    expected: str | None


class RangeReader:
    """`read` over the bytes [start, end) of a binary file."""

    def __init__(self, stream: BinaryIO, start: int, end: int) -> None:
        stream.seek(start)
        self._stream, self._left = stream, end - start

    def read(self, n: int) -> bytes:
        data = self._stream.read(min(n, self._left))
        self._left -= len(data)
        return data


def _scan_job(job: _Job) -> Tally:
    with open(job.path, "rb") as stream:
        reader = RangeReader(stream, job.start, job.end)
        return scan(
            reader.read,
            purpose=job.purpose,
            max_errors=job.max_errors,
            max_line_bytes=job.max_line_bytes,
            expected=job.expected,
        )


def worker_main() -> None:
    """Entry point of a child: its `_Job` as JSON in argv[1], its `Tally` as msgpack on stdout."""
    job = msgspec.json.decode(sys.argv[1], type=_Job)
    sys.stdout.buffer.write(msgspec.msgpack.encode(_scan_job(job)))
    sys.stdout.flush()


def line_starts(path: Path, size: int, parts: int, max_line_bytes: int) -> list[int]:
    """Byte offsets that cut the file into up to `parts` ranges, each starting right after a newline."""
    starts = [0]
    with path.open("rb") as f:
        for k in range(1, parts):
            pos = max(size * k // parts, starts[-1] + 1) - 1
            f.seek(pos)
            scanned = 0
            while scanned <= max_line_bytes:
                chunk = f.read(1 << 16)
                if not chunk:
                    return starts
                nl = chunk.find(b"\n")
                if nl >= 0:
                    if pos + scanned + nl + 1 < size:
                        starts.append(pos + scanned + nl + 1)
                    break
                scanned += len(chunk)
    return starts


def scan_parallel(
    path: Path, size: int, *, workers: int, purpose: str, max_errors: int, max_line_bytes: int
) -> Tally | None:
    """Scan line-aligned ranges at once (this process takes the first) and merge the tallies in order.

    Returns:
        The merged tally, or None when the file cannot be split usefully (the caller scans it in one pass).
    """
    starts = line_starts(path, size, workers, max_line_bytes)
    if len(starts) < 2:
        return None
    ends = [*starts[1:], size]
    expected = None
    if purpose == "fine-tune":
        # The later ranges must know the dataset format that the lines before them establish.
        with path.open("rb") as f:
            decided, expected = first_format(RangeReader(f, 0, ends[0]).read, max_line_bytes)
        if not decided:
            return None
    jobs = [
        _Job(str(path), s, e, purpose, max_errors, max_line_bytes, expected)
        for s, e in zip(starts[1:], ends[1:], strict=True)
    ]
    children = [_start(job) for job in jobs]
    tally = _scan_job(_Job(str(path), 0, ends[0], purpose, max_errors, max_line_bytes, None))
    for job, child in zip(jobs, children, strict=True):
        tally.merge(_collect(job, child))
    return tally


def _start(job: _Job) -> subprocess.Popen[bytes] | None:
    argv = [sys.executable, "-c", _CHILD, msgspec.json.encode(job).decode()]
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:
        return None


def _collect(job: _Job, child: subprocess.Popen[bytes] | None) -> Tally:
    """The child's tally; a child that could not start or failed is replaced by scanning its range here."""
    if child is not None:
        out, err = child.communicate()
        if child.returncode == 0:
            try:
                return msgspec.msgpack.decode(out, type=Tally)
            except msgspec.DecodeError:
                pass
        log.warning("range scan child failed (exit %s): %s", child.returncode, err.decode(errors="replace")[-2000:])
    return _scan_job(job)
