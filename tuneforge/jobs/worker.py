"""The worker: claims queued jobs under a lease, starts them on an executor, ingests their event streams into the
store, and ends each job in exactly one terminal state.

One run per device slot. The worker renews the lease of every job whose run it watches; a reaper in every worker
takes over a job whose lease expired (its worker died) or whose worker is gone from this host: a run that still
lives is adopted, any other is resumed from its last checkpoint (up to `max_attempts`) or ended with an error
that says what happened. A worker that finds it lost a job's lease stops its own run of it. A run on another host
that the taking-over worker cannot see or stop (its server died, the run did not) is fenced instead: it checks the
job's current attempt before it publishes anything (`train/fencing.py`) and stops once a later one exists. So two
servers on one database never run one job twice on one host, never publish it twice across hosts, take over each
other's jobs when one dies, and leave no job `running`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy.orm import Session

from tuneforge.jobs import queue
from tuneforge.jobs.executors.base import Executor, Handle
from tuneforge.jobs.specs import build_spec, work_dir
from tuneforge.settings import Settings, child_environment, run_wandb_key
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import spec_key
from tuneforge.store import Database
from tuneforge.store import jobs as repo
from tuneforge.store.states import TERMINAL, JobStatus
from tuneforge.store.tables import CheckpointRow, JobRow
from tuneforge.train.events import Checkpoint, Event, Metric, Progress, Record, Result, read_events
from tuneforge.train.push import PUSH_TOKEN_ENV
from tuneforge.train.spec import JobPlan

log = logging.getLogger("tuneforge.worker")

S = JobStatus
RESULT_STATUS = {"completed": S.COMPLETED, "cancelled": S.CANCELLED, "error": S.ERROR, "user_error": S.USER_ERROR}
RESULT_EVENT = {"completed": "job_complete", "cancelled": "job_stopped", "error": "job_error",
                "user_error": "job_error"}  # fmt: skip
# Event data a run reports that the job object shows.
_PROGRESS_KEYS = ("token_count", "param_count", "total_steps", "trained_tokens", "masked_tokens", "eval_steps",
                  "wandb_url", "batch_size")  # fmt: skip


def new_worker_id() -> str:
    """`host:pid:random`: unique per worker, and telling a worker on the same host whether its process lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(worker_id: str) -> bool:
    """True when `worker_id` names a worker process of this host that no longer exists (no need to wait for its
    lease to expire). Workers of other hosts, and live pids, are judged by their lease alone."""
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Run:
    job_id: str
    attempt: int
    handle: Handle
    events_path: str
    offset: int = 0
    result: Result | None = None
    cancel_sent_at: float | None = None
    last_seen: float = field(default_factory=time.time)


class Worker:
    """Drives jobs from `queued` to a terminal state. `tick()` does one round; `start()` loops in a thread."""

    def __init__(
        self, db: Database, blobs: BlobStore, settings: Settings, executor: Executor, *, slots: int = 1,
        worker_id: str | None = None,
    ) -> None:  # fmt: skip
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.executor = executor
        self.slots = slots
        self.worker_id = worker_id or new_worker_id()
        self.runs: dict[str, Run] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancels: set[str] = set()
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0
        self._reaped_at = 0.0

    # -- control ---------------------------------------------------------------------------------------
    def start(self, interval_s: float = 0.5) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="tuneforge-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancels.add(job_id)
        self._wake.set()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("worker tick failed")
            self._wake.wait(interval_s)
            self._wake.clear()

    # -- one round -------------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.time()
        if now - self._renewed_at >= self.settings.lease_s / 4:
            self._renew(now)
        self._send_cancels()
        for run in list(self.runs.values()):
            self._ingest(run)
            code = self.executor.poll(run.handle)
            if code is None:
                self._watch(run)
                continue
            self._ingest(run)
            self._finish(run, code)
        if now - self._reaped_at >= self.settings.lease_s / 4:
            self.reap()
        while len(self.runs) < self.slots and self._start_next():
            pass

    def _renew(self, now: float) -> None:
        """Renew our lease on every job we run; forget the runs whose job another worker took over."""
        self._renewed_at = now
        with self.db.session() as s:
            held = repo.renew_leases(s, owner=self.worker_id, job_ids=list(self.runs), now=now)
        lost = set(self.runs) - held
        if not lost:
            return
        with self.db.session() as s:
            adopted = {j.id for j in repo.leased_jobs(s) if j.id in lost and _runs_ours(j, self.runs[j.id])}
        for job_id in lost:
            run = self.runs.pop(job_id)
            if job_id in adopted:
                log.warning("job %s: another worker took over its lease and adopted its run; leaving it", job_id)
            else:
                # The job was requeued or ended without us: our run must not train it a second time.
                log.warning("job %s: its lease was taken over; stopping our run of it", job_id)
                self.executor.kill(run.handle)

    def _send_cancels(self) -> None:
        with self._lock:
            wanted, self._cancels = self._cancels, set()
        with self.db.session() as s:
            for job_id, run in self.runs.items():
                if run.cancel_sent_at is None and repo.get_job(s, job_id=job_id).status == S.CANCEL_REQUESTED:
                    wanted.add(job_id)
        for job_id in wanted:
            target = self.runs.get(job_id)
            if target is not None and target.cancel_sent_at is None:
                target.cancel_sent_at = time.time()
                self.executor.cancel(target.handle)

    def _watch(self, run: Run) -> None:
        now = time.time()
        if run.cancel_sent_at is not None and now - run.cancel_sent_at > self.settings.cancel_grace_s:
            log.warning(
                "job %s did not stop within %.0fs of its cancel; killing it", run.job_id, now - run.cancel_sent_at
            )
            self.executor.kill(run.handle)
        elif now - run.last_seen > self.settings.heartbeat_timeout_s:
            log.warning("job %s sent nothing for %.0fs; killing it", run.job_id, now - run.last_seen)
            self.executor.kill(run.handle)

    # -- starting --------------------------------------------------------------------------------------
    def _start_next(self) -> bool:
        claimed = queue.claim(self.db, worker_id=self.worker_id)
        if claimed is None:
            return False
        job, attempt = claimed.job, claimed.attempt
        try:
            spec = build_spec(job, claimed.plan, settings=self.settings, attempt=attempt, resume_from=claimed.resume)
            os.makedirs(spec.work_dir, exist_ok=True)
            spec_path = os.path.join(spec.work_dir, f"spec-{attempt}.json")
            with open(spec_path, "wb") as fh:
                fh.write(spec.to_json())
            with self.blobs.writer(spec_key(job.id)) as w:
                w.write(spec.to_json())
            env = _run_env(self.settings, claimed.plan, claimed.secrets)
            handle = self.executor.start(spec, spec_path=spec_path, env=env)
        except Exception as exc:
            log.exception("could not start job %s", job.id)
            queue.finish(self.db, job_id=job.id, status=S.ERROR, event_type="job_error", level="error",
                         message=f"Could not start the training process: {exc}", worker_id=self.worker_id)  # fmt: skip
            return True
        run = Run(job_id=job.id, attempt=attempt, handle=handle, events_path=spec.events_path)
        self.runs[job.id] = run
        with self.db.session() as s:
            repo.update_job(
                s, job_id=job.id, held_by=self.worker_id, runner=_runner_json(run), heartbeat_at=time.time()
            )
        return True

    # -- events ----------------------------------------------------------------------------------------
    def _ingest(self, run: Run) -> None:
        """Store the records the run wrote since the last read, in one transaction that holds the job's lease: it
        first renews the lease (so no reaper can take the job until it commits) and ends with the new offset, so
        whoever reads the stream next starts where the stored records end."""
        records, offset = read_events(run.events_path, run.offset)
        if not records:
            return
        run.last_seen = time.time()
        with self.db.session() as s:
            if not repo.update_job(s, job_id=run.job_id, held_by=self.worker_id, heartbeat_at=time.time()):
                return  # taken over: the new holder reads the stream from the stored offset
            job = repo.get_job(s, job_id=run.job_id)
            progress = dict(job.progress or {})
            for rec in records:
                self._apply(s, job, run, rec, progress)
            repo.update_job(s, job_id=run.job_id, held_by=self.worker_id, progress=progress,
                            runner=_runner_json(run, offset=offset))  # fmt: skip
        run.offset = offset

    def _apply(self, session: Session, job: JobRow, run: Run, rec: Record, progress: dict[str, Any]) -> None:
        if isinstance(rec, Event):
            for key in _PROGRESS_KEYS:
                if key in rec.data:
                    progress[key] = rec.data[key]
            if rec.type == "model_uploading" and queue.to_uploading(
                session,
                job_id=job.id,
                worker_id=self.worker_id,
                message=rec.message,
                data=rec.data,
                at=rec.ts,
            ):
                return
            repo.add_event(session, job_id=job.id, type_=rec.type, message=rec.message, level=rec.level,
                           data=dict(rec.data), created_at=rec.ts)  # fmt: skip
        elif isinstance(rec, Metric):
            values: dict[str, float] = {**rec.values}
            values.setdefault("train/global_step", rec.step)
            repo.add_metric(session, job_id=job.id, step=rec.step, values=values, logged_at=rec.ts)
            if "eval/loss" in values:
                progress["evals_completed"] = int(progress.get("evals_completed", 0) or 0) + 1
            if "train/tokens_per_second" in values:
                progress["tokens_per_second"] = values["train/tokens_per_second"]
        elif isinstance(rec, Checkpoint):
            repo.add_checkpoint(session, job_id=job.id, step=rec.step, kind=rec.checkpoint_kind, path=rec.key,
                                created_at=rec.ts)  # fmt: skip
        elif isinstance(rec, Progress):
            _progress(progress, rec, run.attempt)
        else:
            run.result = rec

    # -- ending ----------------------------------------------------------------------------------------
    def _finish(self, run: Run, code: int) -> None:
        """Record the end of a run: its job ends, or is requeued to resume. A cancel or a takeover that lands while
        this is decided is read again; a job that still can't be moved stays leased to us and unwatched, which the
        reaper's next pass picks up."""
        if self.runs.get(run.job_id) is run:
            self.runs.pop(run.job_id)
        for _ in range(3):
            with self.db.session() as s:
                job = repo.get_job(s, job_id=run.job_id)
                ckpt = repo.latest_checkpoint(s, job_id=job.id)
            if job.lease_owner not in (None, self.worker_id) or S(job.status) in TERMINAL:
                return
            if self._end(run, job, ckpt, code):
                return
        log.warning("job %s: could not record the end of its run; the reaper will try again", run.job_id)

    def _end(self, run: Run, job: JobRow, ckpt: CheckpointRow | None, code: int) -> bool:
        result = run.result
        asked_to_stop = job.status == S.CANCEL_REQUESTED
        if result is not None and (result.status != "cancelled" or asked_to_stop):
            status = result.status
            level = "info" if status in ("completed", "cancelled") else "error"
            return queue.finish(self.db, job_id=job.id, status=RESULT_STATUS[status], event_type=RESULT_EVENT[status],
                                message=result.message, level=level, worker_id=self.worker_id) is not None  # fmt: skip
        if asked_to_stop:
            return queue.finish(self.db, job_id=job.id, status=S.CANCELLED, event_type="job_stopped",
                                message="Cancelled by the user", worker_id=self.worker_id) is not None  # fmt: skip
        # Died, or stopped from outside without a cancel (a host shutdown's SIGTERM: the run saved a checkpoint and
        # reported `cancelled`, but nobody asked for that): resumed like any interrupted run.
        what = "it was stopped from outside (not by a cancel)" if result is not None else (
            f"exit code {code}" if code >= 0 else "its worker was lost")  # fmt: skip
        if job.attempt < self.settings.max_attempts:
            where = f"from the checkpoint at step {ckpt.step}" if ckpt else "from the start (no checkpoint yet)"
            message = f"The training process stopped unexpectedly ({what}); resuming {where}"
            moved = queue.requeue(self.db, job_id=job.id, worker_id=self.worker_id, message=message)
            if moved:
                self.wake()
            return moved
        message = (f"The training process stopped unexpectedly ({what}) {job.attempt} times; see the job's events "
                   "for the last progress")  # fmt: skip
        return queue.finish(self.db, job_id=job.id, status=S.ERROR, event_type="job_error", message=message,
                            level="error", worker_id=self.worker_id) is not None  # fmt: skip

    # -- taking over -----------------------------------------------------------------------------------
    def recover(self) -> None:
        """At start: take over the jobs of workers that are gone (a previous server on this host), at once."""
        self.reap()

    def reap(self) -> None:
        """Take over every leased job whose worker stopped renewing its lease (or is gone from this host): adopt
        its run where the run still lives, otherwise resume it from its checkpoint or end it."""
        now = time.time()
        self._reaped_at = now
        with self.db.session() as s:
            leased = repo.leased_jobs(s)
        for job in leased:
            if job.lease_owner == self.worker_id and job.id not in self.runs:
                # Ours, yet no run of ours watches it: ending its run failed half-way (a lost race, a database
                # error). Adopt it again: its stored runner and offset say where it stands.
                log.warning("job %s: leased to us but not watched; adopting it again", job.id)
                self._adopt(job)
        candidates = [j for j in leased if j.lease_owner != self.worker_id]
        for job in candidates:
            expired = job.heartbeat_at is None or job.heartbeat_at < now - self.settings.lease_s
            if not (job.lease_owner is None or expired or owner_is_gone(job.lease_owner)):
                continue
            with self.db.session() as s:
                taken = repo.take_lease(s, job_id=job.id, from_owner=job.lease_owner, seen_heartbeat=job.heartbeat_at,
                                        to_owner=self.worker_id, now=time.time())  # fmt: skip
            if not taken:
                continue
            log.warning("job %s: taking it over from worker %s", job.id, job.lease_owner or "(none)")
            self._adopt(job)

    def _adopt(self, job: JobRow) -> None:
        mine = self.runs.get(job.id)
        if mine is not None:
            if _runs_ours(job, mine):
                return  # the run the job names is ours already: we hold its lease again and go on watching it
            # A run of an earlier attempt that we still watched after losing the job: it must not train it twice.
            log.warning("job %s: stopping our stale run of attempt %d", job.id, mine.attempt)
            self.runs.pop(job.id)
            self.executor.kill(mine.handle)
        runner = job.runner or {}
        handle = runner.get("handle")
        result = msgspec.convert(runner["result"], Result) if runner.get("result") else None
        run = Run(job_id=job.id, attempt=int(runner.get("attempt", job.attempt)), handle=handle or {},
                  events_path=str(runner.get("events_path", "")), offset=int(runner.get("offset", 0)),
                  result=result)  # fmt: skip
        code = -1
        if handle:
            with contextlib.suppress(Exception):
                polled = self.executor.poll(handle)
                code = -1 if polled is None else polled
                if polled is None:
                    self.runs[job.id] = run
                    log.info("job %s: its run still lives; adopted", job.id)
                    return
        if run.events_path:
            self._ingest(run)  # what the run wrote before it ended (its result, if it got that far)
        self._finish(run, code)


def _progress(progress: dict[str, Any], rec: Progress, attempt: int) -> None:
    """Steps done, epochs, and the ETA from the rate since this attempt's first report."""
    step, total = rec.step, rec.total_steps
    progress.update(steps_completed=step, total_steps=total)
    if rec.epoch is not None:
        progress["epochs_completed"] = int(rec.epoch)
    anchor = progress.get("rate_anchor")
    if not isinstance(anchor, list) or anchor[0] != attempt or step < anchor[1]:
        progress["rate_anchor"] = [attempt, step, rec.ts]
    elif step > anchor[1]:
        per_step = (rec.ts - anchor[2]) / (step - anchor[1])
        progress["seconds_remaining"] = max(0, round(per_step * (total - step)))
        progress["estimate_available"] = True


def _runs_ours(job: JobRow, run: Run) -> bool:
    """Whether the job's recorded run is `run` (the same attempt and process): an adopted run, not a new one."""
    runner = job.runner or {}
    return bool(runner.get("handle") == run.handle and runner.get("attempt") == run.attempt)


def _runner_json(run: Run, *, offset: int | None = None) -> dict[str, object]:
    """What another worker (or this one, later) needs to pick the run up: its handle, how far its stream was
    stored, and its result once read (the stream past `offset` no longer holds it)."""
    return {"handle": run.handle, "events_path": run.events_path, "offset": run.offset if offset is None else offset,
            "attempt": run.attempt, "result": msgspec.to_builtins(run.result) if run.result else None}  # fmt: skip


def _run_env(settings: Settings, plan: JobPlan, secrets: dict[str, str]) -> dict[str, str]:
    """The run's explicit environment: the server's allowed variables, and the job's own credentials."""
    extra = {}
    key = run_wandb_key(settings, job_key=secrets.get("wandb_key"),
                        job_base_url=plan.wandb.base_url if plan.wandb else None)  # fmt: skip
    if key:
        extra["WANDB_API_KEY"] = key
    if secrets.get("hf_api_token"):
        extra["HF_TOKEN"] = str(secrets["hf_api_token"])
        if plan.hf_output_repo_name:  # pushes use the job's own token, never the server's HF_TOKEN
            extra[PUSH_TOKEN_ENV] = str(secrets["hf_api_token"])
    env = child_environment(**extra)
    if plan.byom and not secrets.get("hf_api_token"):
        # a repo the user chose: only the user's credentials may open it, never the server's own token
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(name, None)
        env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    return env


__all__ = ["Run", "Worker", "new_worker_id", "work_dir"]
