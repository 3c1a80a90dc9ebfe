"""The event stream (train -> jobs): one JSON object per line, appended and flushed as it happens.

Kinds: `event` (a Together fine-tune event: type, level, message, data), `metric` (step and named values),
`checkpoint` (step, kind, blob key), `progress` (step, total_steps, epoch; doubles as the heartbeat) and
`result` (the run's final word: completed | cancelled | error | user_error, with a message).
The worker reads the file from its last offset, so a restarted server misses nothing.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

import msgspec

RESULT_STATUSES = ("completed", "cancelled", "error", "user_error")


class EventWriter:
    """Appends event lines to a file; every line is flushed so the worker sees it at once."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fh: IO[bytes] = open(path, "ab")  # noqa: SIM115 - kept open for the run
        self._enc = msgspec.json.Encoder()

    def _write(self, record: dict[str, Any]) -> None:
        record.setdefault("ts", time.time())
        self._fh.write(self._enc.encode(record) + b"\n")
        self._fh.flush()

    def event(self, type_: str, message: str, *, level: str = "info", **data: Any) -> None:
        self._write({"kind": "event", "type": type_, "level": level, "message": message, "data": data})

    def metric(self, step: int, **values: float) -> None:
        self._write({"kind": "metric", "step": step, "values": values})

    def checkpoint(self, step: int, key: str, *, kind: str = "intermediate", adapter: bool = True) -> None:
        self._write({"kind": "checkpoint", "step": step, "key": key, "checkpoint_kind": kind, "adapter": adapter})

    def progress(self, step: int, total_steps: int, **extra: Any) -> None:
        self._write({"kind": "progress", "step": step, "total_steps": total_steps, **extra})

    def result(self, status: str, message: str, **data: Any) -> None:
        if status not in RESULT_STATUSES:
            raise ValueError(f"unknown result status {status!r}")
        self._write({"kind": "result", "status": status, "message": message, "data": data})

    def close(self) -> None:
        self._fh.close()


def read_events(path: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete lines written after `offset`; returns them and the new offset (a torn last line waits)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[: end + 1].splitlines():
        if line.strip():
            try:
                records.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                records.append(
                    {
                        "kind": "event",
                        "type": "warning",
                        "level": "warning",
                        "message": "an unreadable event line was skipped",
                        "data": {},
                    }
                )
    return records, offset + end + 1
