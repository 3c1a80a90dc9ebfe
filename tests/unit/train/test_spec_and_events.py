"""The TrainSpec round-trips and hashes stably; the event stream survives torn lines and restarts."""

from typing import get_args

import pytest
from together.types import FinetuneEventType

from tuneforge.train.events import EVENT_TYPES, Event, EventWriter, Metric, Progress, read_events
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, load_spec, standalone_plan


def _spec(hyper: Hyper | None = None, **changes):
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), hyper or Hyper(learning_rate=1e-4))
    base = dict(
        job_id="ft-1", plan=plan, storage_url="/b", cache_dir="/c", work_dir="/w", events_path="/w/events.jsonl",
        training_file_key="files/file-1", output_prefix="jobs/ft-1", output_name="alice/m-x",
    )  # fmt: skip
    return TrainSpec(**(base | changes))


def test_round_trip_and_digest():
    spec = _spec()
    again = load_spec(spec.to_json())
    assert again == spec
    assert _spec(attempt=3, work_dir="/elsewhere").digest() == spec.digest()
    assert _spec(hyper=Hyper(learning_rate=2e-4)).digest() != spec.digest()


def test_other_spec_versions_are_refused():
    for version in (1, 99):
        with pytest.raises(ValueError, match=f"version {version} is not the one"):
            load_spec(_spec(version=version).to_json())


def test_events_are_read_incrementally_as_typed_records(tmp_path):
    path = str(tmp_path / "events.jsonl")
    w = EventWriter(path)
    w.event("training_start", "training started", total_steps=10)
    w.metric(1, **{"train/loss": 2.5})
    records, offset = read_events(path, 0)
    assert [type(r) for r in records] == [Event, Metric]
    assert records[0].type == "training_start" and records[0].data == {"total_steps": 10}
    assert records[1].values == {"train/loss": 2.5}
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "progress", "st')  # a line still being written waits for its end
    more, offset2 = read_events(path, offset)
    assert more == [] and offset2 == offset
    with open(path, "ab") as fh:
        fh.write(b'ep": 2, "total_steps": 10, "ts": 5.0}\n')
    more, _ = read_events(path, offset)
    assert more == [Progress(step=2, total_steps=10, ts=5.0)]
    w.close()


def test_a_line_that_is_no_record_becomes_a_warning(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"kind": "event", "type": "made_up", "message": "x", "ts": 1}\nnot json\n')
    records, _ = read_events(str(path), 0)
    assert [(r.type, r.level) for r in records] == [("warning", "warning")] * 2  # type: ignore[union-attr]
    assert "made_up" in records[0].message  # type: ignore[union-attr]


def test_only_known_types_and_statuses_are_written(tmp_path):
    w = EventWriter(str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError):
        w.result("done", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        w.event("step_done", "x")  # type: ignore[arg-type]
    assert set(EVENT_TYPES) - set(get_args(FinetuneEventType)) == {"eval_complete"}  # the SDK's enum, plus one
