"""The job core end to end, on real servers and real training processes:

- two servers on one database run each of 20 jobs exactly once (counted by training-process starts); when one
  server freezes and its runs die, the other takes its job over once the lease expires and completes it from its
  checkpoint, and the frozen server, SIGKILLed, leaves nothing behind;
- 50 identical concurrent creates make one job (the idempotency key is a unique column);
- the together SDK with strict response validation reads every event and metric of a run with evaluations,
  checkpoints, a SIGKILL-and-resume and a final cancel, and the metrics keep one row per step.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pg_support
import pytest
from e2e_support import unique, wait_until
from ft_support import (
    TERMINAL,
    TINY_LLAMA,
    Watch,
    assert_subsequence,
    client,
    create_job,
    events,
    finish_ft_server,
    ft_server,
    intermediate_steps,
    kill_trainers,
    metrics,
    qa_records,
    skip_without_training,
    start_ft_server,
    train_rows,
    trainer_pids,
    upload_ready,
)

pytestmark = pytest.mark.timeout(420)

LEASE_S = 4.0


def _starts(*homes: Path) -> Counter[str]:
    """Training-process starts per job: the local executor writes `work/<job>/train-<attempt>.log` per start."""
    return Counter(log.parent.name for home in homes for log in (home / "work").glob("ft-*/train-*.log"))


def test_two_servers_on_one_database_run_each_job_once_and_take_over_from_each_other(tmp_path: Path) -> None:
    skip_without_training()
    shared = {"TUNEFORGE_UPLOAD_SECRET": secrets.token_hex(16), "TUNEFORGE_LEASE_S": str(LEASE_S)}
    a = start_ft_server(tmp_path, name="a", env=shared)
    store = {"TUNEFORGE_DATABASE_URL": pg_support.database_url(a.home), "TUNEFORGE_STORAGE_URL": str(a.blobs)}
    b_home = tmp_path / "b-home"
    b = start_ft_server(tmp_path, name="b", env=shared | store, home=b_home)  # the catalog is in the shared store
    servers = {"a": a, "b": b}
    try:
        key = a.create_key("alice-two", "alice")
        clients = {name: client(server, key) for name, server in servers.items()}
        file_id = upload_ready(clients["a"], tmp_path / "short.jsonl", qa_records(2, nonce=unique()))

        # 20 short jobs, created through both servers alternately; both workers claim from the one queue.
        jobs = [
            create_job(clients["ab"[i % 2]], file_id, n_epochs=1, n_checkpoints=1, batch_size=2, suffix=f"two{i}").id
            for i in range(20)
        ]
        for job_id in jobs:
            done = Watch(clients["b"], job_id).finished(timeout=240)
            assert done.status == "completed", f"{job_id} ended {done.status}"
        starts = _starts(a.home, b_home)
        assert {job_id: starts[job_id] for job_id in jobs} == dict.fromkeys(jobs, 1)
        ran_on = {name: len(_starts(server.home)) for name, server in servers.items()}
        assert ran_on["a"] > 0 and ran_on["b"] > 0, ran_on  # both worked: the test is of two workers
        print(f"20 jobs, one start each: {ran_on}")

        # A long job with checkpoints; once it has one, its server freezes (SIGSTOP: alive, renewing nothing)
        # and its training process dies with it. The other server waits out the lease, then resumes the job.
        long_file = upload_ready(clients["a"], tmp_path / "long.jsonl", qa_records(16, nonce=unique()))
        long_job = create_job(clients["a"], long_file, n_epochs=10, batch_size=1, n_checkpoints=8, suffix="long").id
        Watch(clients["a"], long_job).until(
            lambda j: j.status in TERMINAL or (j.status == "running" and intermediate_steps(clients["a"], long_job)),
            timeout=120, what="a first checkpoint", interval=0.05,
        )  # fmt: skip
        holder = next(name for name, server in servers.items() if trainer_pids(server.home, long_job))
        other = "b" if holder == "a" else "a"
        frozen = servers[holder]
        frozen.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert kill_trainers(frozen.home, long_job), "the long job's run was not found"

        c = clients[other]
        watch = Watch(c, long_job)
        watch.until(lambda j: any(e.type == "job_restarted" for e in events(c, long_job)), timeout=60,
                    what="the takeover")  # fmt: skip
        waited = time.monotonic() - stopped_at
        assert waited >= LEASE_S * 0.9, f"taken over after {waited:.1f}s, before the {LEASE_S}s lease expired"
        frozen.proc.send_signal(signal.SIGKILL)
        frozen.proc.wait(10)
        frozen.stopped = True

        done = watch.finished(timeout=200)
        assert done.status == "completed", f"{done.status}: {getattr(done, 'error', None)}"
        evs = events(c, long_job)
        types = [e.type for e in evs]
        assert types.count("job_restarted") == 1 and types.count("job_start") == 2, types
        restarted = next(e for e in evs if e.type == "job_restarted")
        assert "resuming from the checkpoint at step" in restarted.message, restarted.message
        assert "resuming from step" in [e for e in evs if e.type == "job_start"][1].message
        assert _starts(a.home, b_home)[long_job] == 2  # the first run (killed) and the resumed one: no other
        assert _starts(servers[other].home)[long_job] == 1
        steps = sorted(int(r["train/global_step"]) for r in train_rows(metrics(c, long_job)))
        assert steps == list(range(1, 161)), "metrics must hold each step once, after the resume too"
    finally:
        for server in (b, a):
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)  # a test that failed while a server was frozen
            finish_ft_server(server)


def test_fifty_identical_concurrent_creates_make_one_job(tmp_path: Path) -> None:
    skip_without_training()
    with ft_server(tmp_path, owners=("alice",), env={"TUNEFORGE_RUN_WORKER": "false"}) as server:
        c = client(server, server.keys["alice"])
        file_id = upload_ready(c, tmp_path / "data.jsonl", qa_records(2, nonce=unique()))
        body = {"training_file": file_id, "model": TINY_LLAMA, "n_epochs": 1, "suffix": "same"}
        headers = {"Authorization": f"Bearer {server.keys['alice']}"}

        def create(_: int) -> str:
            with httpx.Client(base_url=server.api, headers=headers, timeout=60) as http:
                r = http.post("/fine-tunes", json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["id"])

        for _round in range(3):
            with ThreadPoolExecutor(50) as pool:
                ids = set(pool.map(create, range(50)))
            assert len(ids) == 1, ids
        listed = [j.id for j in c.fine_tuning.list().data or []]
        assert listed == list(ids), listed


def test_strict_sdk_reads_every_event_and_metric_of_a_resumed_then_cancelled_run(tmp_path: Path) -> None:
    skip_without_training()
    with ft_server(tmp_path, owners=("alice",)) as server:
        c = client(server, server.keys["alice"], strict=True)
        train = upload_ready(c, tmp_path / "train.jsonl", qa_records(16, nonce=unique()))
        valid = upload_ready(c, tmp_path / "valid.jsonl", qa_records(4, nonce=unique()))
        job = create_job(c, train, validation_file=valid, n_evals=6, n_epochs=20, batch_size=1, n_checkpoints=10,
                         suffix="strict").id  # fmt: skip
        watch = Watch(c, job)
        watch.until(lambda j: j.status in TERMINAL or intermediate_steps(c, job), timeout=120, what="a checkpoint",
                    interval=0.05)  # fmt: skip
        pids = trainer_pids(server.home, job)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)  # the server sees its run die and resumes it from the checkpoint
        watch.until(lambda j: any(e.type == "job_restarted" for e in events(c, job)), timeout=60, what="a resume")
        resumed_from = max(intermediate_steps(c, job))
        watch.until(lambda j: j.status in TERMINAL or (getattr(j, "steps_completed", 0) or 0) > resumed_from + 20,
                    timeout=120, what="progress after the resume")  # fmt: skip
        wait_until(lambda: len(intermediate_steps(c, job)) >= 2, timeout=120, what="a checkpoint after the resume")
        c.fine_tuning.cancel(job)
        done = watch.finished(timeout=120)
        assert done.status == "cancelled", done.status

        # Each list is read by the strict client: a type outside the SDK's enums would raise here.
        evs = events(c, job)
        types = [str(e.type) for e in evs]
        assert_subsequence(types, ("job_pending", "job_start", "training_start", "checkpoint_save", "job_restarted",
                                   "job_start", "training_start", "cancel_requested", "job_stopped"))  # fmt: skip
        assert "epoch_complete" in types  # step reports and evaluations, in the SDK's names
        rows = metrics(c, job)
        train = [int(r["train/global_step"]) for r in train_rows(rows)]
        evals = [int(r["train/global_step"]) for r in rows if "eval/loss" in r]
        assert train == sorted(set(train)) and train[0] == 1, "one train row per step, in order"
        assert train == list(range(1, train[-1] + 1)), "no step lost or repeated across the resume"
        assert evals and len(evals) == len(set(evals)), evals
        assert c.fine_tuning.list_checkpoints(job).data
