"""The TrainSpec round-trips and hashes stably; the event stream survives torn lines and restarts."""

import pytest

from tuneforge.train.events import EventWriter, read_events
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, load_spec


def _spec(**changes):
    base = dict(
        job_id="ft-1", model=ModelSource(name="m", source_kind="local", source="/m"), storage_url="/b",
        cache_dir="/c", work_dir="/w", events_path="/w/events.jsonl", training_file_key="files/file-1",
        output_prefix="jobs/ft-1", output_name="alice/m-x", hyper=Hyper(learning_rate=1e-4),
    )  # fmt: skip
    return TrainSpec(**(base | changes))


def test_round_trip_and_digest():
    spec = _spec()
    again = load_spec(spec.to_json())
    assert again == spec
    assert _spec(attempt=3, work_dir="/elsewhere").digest() == spec.digest()
    assert _spec(hyper=Hyper(learning_rate=2e-4)).digest() != spec.digest()


def test_newer_spec_versions_are_refused():
    raw = _spec(version=99).to_json()
    with pytest.raises(ValueError, match="newer"):
        load_spec(raw)


def test_events_are_read_incrementally(tmp_path):
    path = str(tmp_path / "events.jsonl")
    w = EventWriter(path)
    w.event("training_start", "training started", total_steps=10)
    w.metric(1, **{"train/loss": 2.5})
    records, offset = read_events(path, 0)
    assert [r["kind"] for r in records] == ["event", "metric"]
    assert records[0]["data"] == {"total_steps": 10}
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "progress", "st')  # a line still being written waits for its end
    more, offset2 = read_events(path, offset)
    assert more == [] and offset2 == offset
    with open(path, "ab") as fh:
        fh.write(b'ep": 2, "total_steps": 10}\n')
    more, _ = read_events(path, offset)
    assert more == [{"kind": "progress", "step": 2, "total_steps": 10}]
    w.close()


def test_unknown_result_status_is_refused(tmp_path):
    w = EventWriter(str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError):
        w.result("done", "x")
