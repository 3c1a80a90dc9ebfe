"""Fine-tuning when things go wrong, end to end: a training process killed while its server is down is resumed from
its checkpoint by the next server; jobs that cannot train end in `error` / `user_error` with a reason a person can
act on, never stuck; the API keeps answering while a job trains.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LiveServer, unique
from ft_support import (
    TERMINAL,
    TINY_LLAMA,
    Watch,
    assert_subsequence,
    checkpoints,
    client,
    create_job,
    event_types,
    events,
    finish_ft_server,
    ft_server,
    intermediate_steps,
    metrics,
    qa_records,
    skip_without_training,
    start_ft_server,
    train_rows,
    trainer_pids,
    upload_ready,
)
from together import Together

pytestmark = pytest.mark.timeout(240)

FAILED = ("error", "user_error")


# --- (a) a run killed while the server is down ----------------------------------------------------------------------


def test_a_killed_run_is_resumed_from_its_checkpoint_after_a_restart(tmp_path: Path) -> None:
    skip_without_training()
    first = start_ft_server(tmp_path, slots=1)
    second: LiveServer | None = None
    try:
        key = first.create_key("alice-resume", "alice")
        c = client(first, key)
        file_id = upload_ready(c, tmp_path / "data.jsonl", qa_records(16, nonce=unique()))
        # 160 one-example steps with a checkpoint every 20: several seconds of training after the first checkpoint.
        job = create_job(c, file_id, n_epochs=10, batch_size=1, n_checkpoints=8, suffix="resume")
        total = 160
        Watch(c, job.id).until(
            lambda j: j.status in TERMINAL or (j.status == "running" and intermediate_steps(c, job.id)),
            timeout=120,
            what="a first checkpoint",
            interval=0.05,
        )

        # Stop the server: the run goes on without it (it has its own session). Then kill the run mid-training.
        first.stop()
        pids = trainer_pids(first.home, job.id)
        assert len(pids) == 1, f"expected the job's training process to outlive the server, found {pids}"
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while trainer_pids(first.home, job.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not trainer_pids(first.home, job.id)

        second = start_ft_server(tmp_path, slots=1, home=first.home)
        c = client(second, key)
        watch = Watch(c, job.id)
        done = watch.finished(timeout=150)
        assert done.status == "completed", f"{done.status}: {getattr(done, 'error', None)}"

        evs = events(c, job.id)
        types = [str(e.type) for e in evs]
        assert_subsequence(
            types,
            ("job_start", "training_start", "checkpoint_save", "job_restarted", "job_start", "training_start",
             "model_uploading", "job_complete"),
        )  # fmt: skip
        assert types.count("job_restarted") == 1, types
        restarted = next(e for e in evs if e.type == "job_restarted")
        m = re.search(r"step (\d+)", restarted.message)
        assert m, f"job_restarted does not name the checkpoint it resumes from: {restarted.message!r}"
        resume_step = int(m[1])
        print(f"resumed from step {resume_step} of {total}")
        assert 0 < resume_step < total and resume_step % 20 == 0, restarted.message
        assert resume_step in intermediate_steps(c, job.id)
        starts = [e for e in evs if e.type == "job_start"]
        assert len(starts) == 2 and f"resuming from step {resume_step}" in starts[1].message, starts[1].message
        trainings = [e for e in evs if e.type == "training_start"]
        assert f"from step {resume_step}" in trainings[-1].message, trainings[-1].message

        assert getattr(done, "steps_completed", None) == total and getattr(done, "total_steps", None) == total
        finals = [cp.step for cp in checkpoints(c, job.id) if "final" in cp.checkpoint_type.lower()]
        assert finals and set(finals) == {total}, finals
        steps = {int(r["train/global_step"]) for r in train_rows(metrics(c, job.id))}
        assert steps == set(range(1, total + 1)), sorted(set(range(1, total + 1)) - steps)
    finally:
        for server in (second, first):
            if server is not None:
                finish_ft_server(server)


# --- (b) jobs that cannot train ---------------------------------------------------------------------------------------


@dataclass
class Doomed:
    client: Together
    all_masked: str
    truncated: str
    broken_file: str


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("ft-rel"), owners=("alice",), slots=3) as server:
        yield server


@pytest.fixture(scope="module")
def alice(ft: LiveServer) -> Together:
    return client(ft, ft.keys["alice"])


@pytest.fixture(scope="module")
def doomed(ft: LiveServer, alice: Together, tmp_path_factory: pytest.TempPathFactory) -> Doomed:
    """Three jobs that pass every check at creation and cannot train; created together, they run side by side."""
    folder = tmp_path_factory.mktemp("doomed")

    # Every assistant message has weight 0: no token is trained on.
    masked = qa_records(4, nonce=unique())
    for r in masked:
        for m in r["messages"]:
            if m["role"] == "assistant":
                m["weight"] = 0
    masked_id = upload_ready(alice, folder / "masked.jsonl", masked)

    # A system prompt longer than max_seq_length: truncation leaves no answer token in any example.
    long_system = "You are a patient assistant who answers questions about made-up places. " * 4
    truncated_id = upload_ready(alice, folder / "long.jsonl", qa_records(4, nonce=unique(), system=long_system))

    # A file that passed the server's check and is unreadable by the time the job trains (storage went bad).
    broken_id = upload_ready(alice, folder / "broken.jsonl", qa_records(4, nonce=unique()))
    blob = ft.blobs / "files" / broken_id
    assert blob.is_file(), blob
    blob.write_bytes(b"\x00\xffthis is not JSON at all\n" * 50)

    return Doomed(
        client=alice,
        all_masked=create_job(alice, masked_id, suffix="masked").id,
        truncated=create_job(alice, truncated_id, max_seq_length=32, suffix="truncated").id,
        broken_file=create_job(alice, broken_id, suffix="broken").id,
    )


def assert_failed_readably(c: Together, job_id: str, statuses: tuple[str, ...] = FAILED) -> Any:
    """The job ends failed within the time limit, with one error event and an `error` a person can read."""
    job = Watch(c, job_id).finished(timeout=120)
    assert job.status in statuses, f"{job_id} ended {job.status}"
    reason = getattr(job, "error", None)
    assert isinstance(reason, str) and len(reason.strip()) > 20, f"no readable reason on the job: {reason!r}"
    assert "Traceback" not in reason and 'File "' not in reason, reason
    evs = events(c, job_id)
    errors = [e for e in evs if e.type == "job_error"]
    assert len(errors) == 1 and errors[0].level == "error", [(e.type, e.level) for e in evs]
    assert errors[0].message == reason, (errors[0].message, reason)
    assert evs[-1].type == "job_error", [e.type for e in evs]
    assert "job_start" in [e.type for e in evs]
    assert not [cp for cp in checkpoints(c, job_id) if "final" in cp.checkpoint_type.lower()]
    return job


def test_a_dataset_with_nothing_to_train_on_is_a_user_error(doomed: Doomed) -> None:
    job = assert_failed_readably(doomed.client, doomed.all_masked, ("user_error",))
    assert "masked" in job.error.lower() or "nothing to learn" in job.error.lower(), job.error


def test_truncation_that_leaves_nothing_to_train_is_a_user_error(doomed: Doomed) -> None:
    job = assert_failed_readably(doomed.client, doomed.truncated, ("user_error",))
    assert "max_seq_length" in job.error or "trunc" in job.error.lower(), job.error


def test_a_training_file_broken_after_its_check_fails_the_job(doomed: Doomed) -> None:
    job = assert_failed_readably(doomed.client, doomed.broken_file)
    assert doomed.broken_file in job.error or "training file" in job.error.lower(), job.error


# --- (c) the API while a job trains ----------------------------------------------------------------------------------


def test_the_api_keeps_answering_while_a_job_trains(ft: LiveServer, alice: Together, tmp_path: Path) -> None:
    file_id = upload_ready(alice, tmp_path / "long.jsonl", qa_records(48, nonce=unique()))
    job = create_job(alice, file_id, n_epochs=20, batch_size=1, n_checkpoints=1, suffix="busy")
    watch = Watch(alice, job.id)
    first = watch.until(
        lambda j: j.status in TERMINAL or (j.status == "running" and (getattr(j, "steps_completed", 0) or 0) >= 1),
        timeout=120,
        what="training to start",
    )
    assert first.status == "running", first.status

    slowest: dict[str, float] = {}
    paths = [
        "/health",
        "/v1/fine-tunes",
        f"/v1/fine-tunes/{job.id}",
        f"/v1/fine-tunes/{job.id}/events",
        f"/v1/fine-tunes/{job.id}/metrics",
        "/v1/files",
        "/v1/models",
        f"/v1/fine-tunes/models/limits?model_name={TINY_LLAMA}",
    ]
    with ft.http(ft.keys["alice"], timeout=10) as http:
        until = time.monotonic() + 4
        while time.monotonic() < until:
            for path in paths:
                started = time.perf_counter()
                r = http.get(path)
                took = time.perf_counter() - started
                assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:300]}"
                slowest[path] = max(slowest.get(path, 0.0), took)
    assert max(slowest.values()) < 2.0, f"slowest answers while training: {slowest}"
    later = watch.poll()
    assert later.status == "running", later.status
    assert later.steps_completed > first.steps_completed, "the job did not train while the API was busy"
    # A few seconds into training the job has a time estimate (the CLI's progress bar reads it).
    assert later.started_at is not None
    assert later.progress is not None and later.progress.estimate_available, later.progress
    assert later.progress.seconds_remaining > 0, later.progress

    alice.fine_tuning.cancel(job.id)
    assert watch.finished(timeout=60).status == "cancelled"
    assert "job_stopped" in event_types(alice, job.id)
