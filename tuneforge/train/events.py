"""The event stream (train -> jobs), typed once: one JSON object per line, a msgspec tagged union on `kind`.

Kinds: `event` (a fine-tune event: type, level, message, data), `metric` (step and named values), `checkpoint`
(step, kind, blob key), `progress` (step, total_steps, epoch; doubles as the heartbeat) and `result` (the run's
final word: completed | cancelled | error | user_error, with a message). The training process writes them with
`EventWriter`; the worker reads them back with `read_events` into the same types, from its last offset, so a
restarted server misses nothing. The API maps each event type to the together SDK's event-type enum.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any, Literal, get_args

import msgspec

# Every event type a run or the worker records: the together SDK's own enum, and `eval_complete` (an evaluation
# on the validation file), which the SDK's generated enum lacks: the API shows it as `epoch_complete`, with
# `tuneforge_type` saying what it is. Per-step progress is not an event: it is the metrics and the job's progress.
EventType = Literal[
    "job_pending", "job_start", "job_stopped", "model_downloading", "model_download_complete",
    "training_data_downloading", "training_data_download_complete", "validation_data_downloading",
    "validation_data_download_complete", "wandb_init", "training_start", "checkpoint_save", "billing_limit",
    "epoch_complete", "training_complete", "model_compressing", "model_compression_complete", "model_uploading",
    "model_upload_complete", "job_complete", "job_error", "cancel_requested", "job_restarted", "refund", "warning",
    "early_stopped", "tokenized_dataset_upload_complete",
    "eval_complete",
]  # fmt: skip
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
Level = Literal["info", "warning", "error"]
ResultStatus = Literal["completed", "cancelled", "error", "user_error"]
RESULT_STATUSES: tuple[str, ...] = get_args(ResultStatus)


class Event(msgspec.Struct, tag="event", tag_field="kind", kw_only=True, frozen=True):
    type: EventType
    message: str
    level: Level = "info"
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float


class Metric(msgspec.Struct, tag="metric", tag_field="kind", kw_only=True, frozen=True):
    step: int
    values: dict[str, float]
    ts: float


class Checkpoint(msgspec.Struct, tag="checkpoint", tag_field="kind", kw_only=True, frozen=True):
    step: int
    key: str  # blob prefix of the saved folder
    checkpoint_kind: Literal["intermediate", "final"] = "intermediate"
    adapter: bool = True
    ts: float


class Progress(msgspec.Struct, tag="progress", tag_field="kind", kw_only=True, frozen=True):
    step: int
    total_steps: int
    epoch: float | None = None
    ts: float


class Result(msgspec.Struct, tag="result", tag_field="kind", kw_only=True, frozen=True):
    status: ResultStatus
    message: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float


Record = Event | Metric | Checkpoint | Progress | Result
_DECODER = msgspec.json.Decoder(Record)
_ENCODER = msgspec.json.Encoder()


class EventWriter:
    """Appends records to a file; every line is flushed so the worker sees it at once."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fh: IO[bytes] = open(path, "ab")  # noqa: SIM115 - kept open for the run

    def write(self, record: Record) -> None:
        self._fh.write(_ENCODER.encode(record) + b"\n")
        self._fh.flush()

    def event(self, type_: EventType, message: str, *, level: Level = "info", **data: Any) -> None:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        self.write(Event(type=type_, message=message, level=level, data=data, ts=time.time()))

    def metric(self, step: int, **values: float) -> None:
        self.write(Metric(step=step, values={k: float(v) for k, v in values.items()}, ts=time.time()))

    def checkpoint(
        self, step: int, key: str, *, kind: Literal["intermediate", "final"] = "intermediate", adapter: bool = True
    ) -> None:
        self.write(Checkpoint(step=step, key=key, checkpoint_kind=kind, adapter=adapter, ts=time.time()))

    def progress(self, step: int, total_steps: int, *, epoch: float | None = None) -> None:
        self.write(Progress(step=step, total_steps=total_steps, epoch=epoch, ts=time.time()))

    def result(self, status: ResultStatus, message: str, **data: Any) -> None:
        if status not in RESULT_STATUSES:
            raise ValueError(f"unknown result status {status!r}")
        self.write(Result(status=status, message=message, data=data, ts=time.time()))

    def close(self) -> None:
        self._fh.close()


class NullEventWriter(EventWriter):
    """An event stream that drops every record: the one a data-parallel run's ranks other than 0 write to
    (`train/distributed.py`), so the run has one voice (one `result`, one metric per step) while every rank runs
    the same recipe code."""

    def __init__(self) -> None:  # no file: nothing is ever written
        pass

    def write(self, record: Record) -> None:
        pass

    def close(self) -> None:
        pass


def read_events(path: str, offset: int) -> tuple[list[Record], int]:
    """Complete records written after `offset`; returns them and the new offset (a torn last line waits).

    A line that does not decode as a record becomes a warning event, so one bad line never stops the stream.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records: list[Record] = []
    for line in data[: end + 1].splitlines():
        if not line.strip():
            continue
        try:
            records.append(_DECODER.decode(line))
        except msgspec.DecodeError as exc:
            records.append(Event(type="warning", level="warning", ts=time.time(),
                                 message=f"an unreadable event line was skipped ({exc})"))  # fmt: skip
    return records, offset + end + 1
