"""The scale-out set-up, for real on one machine: one PostgreSQL server, one S3 bucket (moto's server), one local
Ray cluster, and two tuneforge servers sharing them (`TUNEFORGE_EXECUTOR=ray`).

20 jobs submitted through both servers all complete, each trained exactly once: one Ray job per tuneforge job, one
attempt, one `job_start`. One server is SIGKILLed while jobs run: its runs live on as Ray jobs, and the other
server takes its jobs over once their leases expire (adopting the running Ray jobs by their handles) and finishes
them. Only the first pass of `make test` runs this folder (the test chooses its engines itself).
"""

from __future__ import annotations

import secrets
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pg_support
import pytest
import ray_support
from e2e_support import unique, wait_until
from ft_support import Watch, client, create_job, events, finish_ft_server, qa_records, start_ft_server, upload_ready
from s3_support import S3Server

pytestmark = pytest.mark.timeout(600)
LEASE_S = 4.0
JOBS = 20


def _ray_jobs(address: str) -> list[tuple[str, str]]:
    from ray.job_submission import JobSubmissionClient

    return [(j.submission_id or "", str(j.status)) for j in JobSubmissionClient(address).list_jobs()]


def test_two_servers_one_database_one_bucket_one_ray_cluster(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    ray = ray_support.cluster()
    s3 = S3Server.start(tmp_path / "moto.log")
    shared = {
        "TUNEFORGE_DATABASE_URL": pg_support.server().database(f"cluster_{uuid.uuid4().hex[:12]}"),
        "TUNEFORGE_STORAGE_URL": s3.bucket_url("cluster"),
        **s3.env(),
        "TUNEFORGE_UPLOAD_SECRET": secrets.token_hex(16),
        "TUNEFORGE_SECRETS_KEY": Fernet.generate_key().decode(),
        "TUNEFORGE_EXECUTOR": "ray",
        "TUNEFORGE_RAY_ADDRESS": ray.address,
        "TUNEFORGE_LEASE_S": str(LEASE_S),
        "TUNEFORGE_TRAIN_SLOTS": "2",
    }
    a = b = None
    try:
        a = start_ft_server(tmp_path, name="a", env=shared)
        b = start_ft_server(tmp_path, name="b", env=shared, home=tmp_path / "b-home")  # the catalog is shared
        key = a.create_key("alice-cluster", "alice")
        clients = {"a": client(a, key), "b": client(b, key)}
        file_id = upload_ready(clients["a"], tmp_path / "short.jsonl", qa_records(2, nonce=unique()))

        jobs = [
            create_job(clients["ab"[i % 2]], file_id, n_epochs=1, n_checkpoints=1, batch_size=2, suffix=f"c{i}").id
            for i in range(JOBS)
        ]
        # Once runs are under way, server a dies at once: its runs are Ray jobs, not its children, and live on.
        wait_until(lambda: sum(1 for _, s in _ray_jobs(ray.address) if s.endswith("RUNNING")) >= 2, timeout=120,
                   what="runs under way on the Ray cluster", interval=0.2)  # fmt: skip
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        a.stopped = True
        killed_at = time.monotonic()

        for job_id in jobs:
            done = Watch(clients["b"], job_id).finished(timeout=400)
            assert done.status == "completed", f"{job_id} ended {done.status}: {getattr(done, 'error', None)}"
        print(f"{JOBS} jobs completed {time.monotonic() - killed_at:.0f} s after server a was killed")

        # Each trained exactly once: one Ray job (attempt 1) per tuneforge job, which succeeded, and one start.
        mine = Counter(sid for sid, _ in _ray_jobs(ray.address) if sid.startswith("tuneforge-train-"))
        for job_id in jobs:
            runs = [sid for sid in mine if sid.startswith(f"tuneforge-train-{job_id}-")]
            assert runs == [f"tuneforge-train-{job_id}-1"] and mine[runs[0]] == 1, (job_id, runs)
            starts = [e.type for e in events(clients["b"], job_id)].count("job_start")
            assert starts == 1, f"{job_id} started {starts} times"
        statuses = dict(_ray_jobs(ray.address))
        assert all(statuses[f"tuneforge-train-{j}-1"].endswith("SUCCEEDED") for j in jobs), statuses
    finally:
        for server in (b, a):
            if server is not None:
                finish_ft_server(server)
        s3.stop()
