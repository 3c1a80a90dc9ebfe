"""The worker: claims queued jobs, starts them on an executor, ingests their event streams into the store,
and ends each job in exactly one terminal state.

One run per device slot. A run that dies without its final word is resumed from its last checkpoint
(up to `max_attempts`), or ended with an error that says what happened; after a server restart, runs
that still live are adopted and the others are resumed or ended the same way. Never left `running`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tuneforge.jobs.executors.base import Executor, Handle
from tuneforge.jobs.specs import build_spec, work_dir
from tuneforge.jobs.states import TERMINAL, JobStatus, can_transition
from tuneforge.settings import Settings, inherited_environment
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import spec_key
from tuneforge.store import Database
from tuneforge.store import jobs as repo
from tuneforge.store.tables import CheckpointRow, FileRow, JobRow
from tuneforge.train.events import read_events

log = logging.getLogger("tuneforge.worker")

S = JobStatus
LIVE_RUN = (S.RUNNING, S.UPLOADING, S.CANCEL_REQUESTED)
RESULT_STATUS = {
    "completed": S.COMPLETED,
    "cancelled": S.CANCELLED,
    "error": S.ERROR,
    "user_error": S.USER_ERROR,
}
RESULT_EVENT = {
    "completed": "job_complete",
    "cancelled": "job_stopped",
    "error": "job_error",
    "user_error": "job_error",
}


@dataclass
class Run:
    job_id: str
    attempt: int
    handle: Handle
    events_path: str
    offset: int = 0
    result: dict[str, Any] | None = None
    cancel_sent_at: float | None = None
    last_seen: float = field(default_factory=time.time)


class Worker:
    """Drives jobs from `queued` to a terminal state. `tick()` does one round; `start()` loops in a thread."""

    def __init__(
        self, db: Database, blobs: BlobStore, settings: Settings, executor: Executor, *, slots: int = 1
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.executor = executor
        self.slots = slots
        self.runs: dict[str, Run] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancels: set[str] = set()
        self._thread: threading.Thread | None = None

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
        self._send_cancels()
        for run in list(self.runs.values()):
            self._ingest(run)
            code = self.executor.poll(run.handle)
            if code is None:
                self._watch(run)
                continue
            self._ingest(run)
            self._finish(run, code)
        while len(self.runs) < self.slots and self._start_next():
            pass

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
        with self.db.session() as s:
            job = repo.claim_next(s)
            if job is None:
                return False
            attempt = job.attempt + 1
            resume = _latest_checkpoint(repo.list_checkpoints(s, job_id=job.id)) if job.attempt else None
            note = f" (attempt {attempt}, resuming from step {resume.step})" if resume else ""
            moved = repo.transition(
                s,
                job_id=job.id,
                from_statuses=(S.QUEUED,),
                to_status=S.RUNNING,
                event_type="job_start",
                message=f"Job started{note}",
                attempt=attempt,
                started_at=job.started_at or time.time(),
            )
            if not moved:
                return True  # another worker took it; look again
            file_row = s.get(FileRow, job.training_file)
            file_type = file_row.file_type if file_row is not None else "jsonl"
            secrets = dict(job.secrets or {})
        try:
            spec = build_spec(job, settings=self.settings, attempt=attempt, training_file_type=file_type,
                              resume_from=resume)  # fmt: skip
            os.makedirs(spec.work_dir, exist_ok=True)
            spec_path = os.path.join(spec.work_dir, f"spec-{attempt}.json")
            with open(spec_path, "wb") as fh:
                fh.write(spec.to_json())
            with self.blobs.writer(spec_key(job.id)) as w:
                w.write(spec.to_json())
            handle = self.executor.start(spec, spec_path=spec_path, env=_run_env(secrets))
        except Exception as exc:
            log.exception("could not start job %s", job.id)
            self._end(job.id, S.ERROR, "job_error", f"Could not start the training process: {exc}", level="error")
            return True
        run = Run(job_id=job.id, attempt=attempt, handle=handle, events_path=spec.events_path)
        self.runs[job.id] = run
        with self.db.session() as s:
            repo.update_job(s, job_id=job.id, runner=_runner_json(run), heartbeat_at=time.time())
        return True

    # -- events ----------------------------------------------------------------------------------------
    def _ingest(self, run: Run) -> None:
        records, offset = read_events(run.events_path, run.offset)
        if not records:
            return
        run.last_seen = time.time()
        with self.db.session() as s:
            job = repo.get_job(s, job_id=run.job_id)
            progress = dict(job.progress or {})
            for rec in records:
                self._apply(s, job, run, rec, progress)
            run.offset = offset
            repo.update_job(s, job_id=run.job_id, progress=progress, runner=_runner_json(run), heartbeat_at=time.time())

    def _apply(self, s: Any, job: JobRow, run: Run, rec: dict[str, Any], progress: dict[str, Any]) -> None:
        kind = rec.get("kind")
        ts = float(rec.get("ts") or time.time())
        if kind == "event":
            data = dict(rec.get("data") or {})
            for key in ("token_count", "param_count", "total_steps", "trained_tokens", "masked_tokens", "eval_steps",
                        "wandb_url"):  # fmt: skip
                if key in data:
                    progress[key] = data[key]
            if rec.get("type") == "model_uploading":
                moved = repo.transition(s, job_id=job.id, from_statuses=(S.RUNNING,), to_status=S.UPLOADING,
                                        event_type="model_uploading", message=str(rec.get("message", "")),
                                        event_data=data, event_created_at=ts)  # fmt: skip
                if moved:
                    return
            repo.add_event(s, job_id=job.id, type_=str(rec.get("type", "warning")), message=str(rec.get("message", "")),
                           level=str(rec.get("level", "info")), data=data, created_at=ts)  # fmt: skip
        elif kind == "metric":
            values = dict(rec.get("values") or {})
            values.setdefault("train/global_step", rec.get("step", 0))
            repo.add_metric(s, job_id=job.id, step=int(rec.get("step", 0)), values=values, logged_at=ts)
            if "eval/loss" in values:
                progress["evals_completed"] = int(progress.get("evals_completed", 0)) + 1
            if "train/tokens_per_second" in values:
                progress["tokens_per_second"] = values["train/tokens_per_second"]
        elif kind == "checkpoint":
            repo.add_checkpoint(s, job_id=job.id, step=int(rec.get("step", 0)), kind=str(rec.get("checkpoint_kind",
                                "intermediate")), path=str(rec["key"]), created_at=ts)  # fmt: skip
        elif kind == "progress":
            step, total = int(rec.get("step", 0)), int(rec.get("total_steps", 0))
            progress.update(steps_completed=step, total_steps=total)
            if "epoch" in rec:
                progress["epochs_completed"] = int(float(rec["epoch"]))
            anchor = progress.get("rate_anchor")
            if not anchor or anchor[0] != run.attempt or step < anchor[1]:
                progress["rate_anchor"] = [run.attempt, step, ts]
            elif step > anchor[1]:
                per_step = (ts - anchor[2]) / (step - anchor[1])
                progress["seconds_remaining"] = max(0, round(per_step * (total - step)))
                progress["estimate_available"] = True
        elif kind == "result":
            run.result = rec

    # -- ending ----------------------------------------------------------------------------------------
    def _finish(self, run: Run, code: int) -> None:
        self.runs.pop(run.job_id, None)
        result = run.result
        if result is not None and result.get("status") in RESULT_STATUS:
            status = result["status"]
            level = "info" if status in ("completed", "cancelled") else "error"
            self._end(run.job_id, RESULT_STATUS[status], RESULT_EVENT[status], str(result.get("message", status)),
                      level=level)  # fmt: skip
            return
        with self.db.session() as s:
            job = repo.get_job(s, job_id=run.job_id)
            if job.status == S.CANCEL_REQUESTED:
                moved = False
            elif job.attempt < self.settings.max_attempts:
                ckpt = _latest_checkpoint(repo.list_checkpoints(s, job_id=job.id))
                where = f"from the checkpoint at step {ckpt.step}" if ckpt else "from the start (no checkpoint yet)"
                moved = repo.transition(
                    s, job_id=job.id, from_statuses=LIVE_RUN[:2], to_status=S.QUEUED, event_type="job_restarted",
                    message=f"The training process stopped unexpectedly (exit code {code}); resuming {where}",
                    level="warning", runner=None,
                )  # fmt: skip
            else:
                moved = False
        if moved:
            self.wake()
            return
        if job.status == S.CANCEL_REQUESTED:
            self._end(run.job_id, S.CANCELLED, "job_stopped", "Cancelled by the user")
        else:
            message = (
                f"The training process stopped unexpectedly (exit code {code}) {job.attempt} times; "
                "see the job's events for the last progress"
            )
            self._end(run.job_id, S.ERROR, "job_error", message, level="error")

    def _end(self, job_id: str, status: str, event_type: str, message: str, *, level: str = "info") -> None:
        with self.db.session() as s:
            current = repo.get_job(s, job_id=job_id).status
            if current in TERMINAL:
                return
            if not can_transition(current, status):
                # Only a cancel can stand in the way (cancel_requested may end only as cancelled or failed):
                # a run that finished while its cancel was on the way still ends cancelled, its weights kept.
                status, event_type = S.CANCELLED, "job_stopped"
                message = f"Cancelled by the user ({message[:1].lower()}{message[1:]} before the cancel arrived)"
                level = "info"
            repo.transition(
                s, job_id=job_id, from_statuses=(*tuple(LIVE_RUN), S.QUEUED, S.PENDING), to_status=status,
                event_type=event_type, message=message, level=level, finished_at=time.time(), runner=None,
                error=message if status in (S.ERROR, S.USER_ERROR) else None,
                secrets={},  # an ended job needs no key any more: none is kept at rest
            )  # fmt: skip

    # -- restart ---------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Adopt the live runs of a previous server; resume or end the dead ones."""
        with self.db.session() as s:
            orphans = repo.jobs_in(s, statuses=tuple(LIVE_RUN))
        for job in orphans:
            runner = job.runner or {}
            if "handle" not in runner:
                if job.status == S.CANCEL_REQUESTED:
                    self._end(job.id, S.CANCELLED, "job_stopped", "Cancelled by the user")
                else:
                    run = Run(job_id=job.id, attempt=job.attempt, handle={}, events_path="")
                    self._finish(run, -1)
                continue
            run = Run(job_id=job.id, attempt=int(runner.get("attempt", job.attempt)), handle=runner["handle"],
                      events_path=runner["events_path"], offset=int(runner.get("offset", 0)))  # fmt: skip
            self.runs[job.id] = run
            log.info("recovering job %s from a previous server", job.id)


def _latest_checkpoint(rows: list[CheckpointRow]) -> CheckpointRow | None:
    resumable = [r for r in rows if r.kind == "intermediate"]
    return max(resumable, key=lambda r: r.step) if resumable else None


def _runner_json(run: Run) -> dict[str, Any]:
    return {"handle": run.handle, "events_path": run.events_path, "offset": run.offset, "attempt": run.attempt}


def _run_env(secrets: dict[str, Any]) -> dict[str, str]:
    env = inherited_environment()
    env["PYTHONUNBUFFERED"] = "1"
    # OpenMP threads that spin while they wait collapse throughput when cores are shared (measured 10x+).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if secrets.get("wandb_key"):
        env["WANDB_API_KEY"] = str(secrets["wandb_key"])
    if secrets.get("hf_api_token"):
        env["HF_TOKEN"] = str(secrets["hf_api_token"])
    return env


__all__ = ["Run", "Worker", "work_dir"]
