"""Data-parallel SFT (`train/distributed.py`): two processes under torchrun (gloo, one thread each), started by the
local executor as the job worker starts them, train the curve one process trains on the same global batch and seed;
a checkpoint does not depend on the number of processes and resumes at one or two to the uninterrupted curve; only
rank 0 writes the event stream; a cancel's SIGTERM reaches every rank, which checkpoint at the same step and report
`cancelled`, and a kill takes the ranks down with torchrun."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from recipe_support import Job, conversations, make_job, run_in_process
from safetensors.torch import load_file

from tuneforge.jobs.executors.base import Handle
from tuneforge.jobs.executors.local import LocalExecutor
from tuneforge.storage.layout import checkpoint_prefix, final_prefix
from tuneforge.train.spec import Resume

# 17 examples, 8 a step in 2 micro-batches: steps of 8, 8 and 1 examples an epoch (the last leaves one rank without
# an example), 6 steps in all, a checkpoint at step 3 (mid-epoch), evaluations at steps 3 and 6. fp32: the 1e-4
# tolerance is for the summation order only.
HYPER = {"batch_size": 8, "gradient_accumulation_steps": 2, "n_epochs": 2, "n_checkpoints": 2, "n_evals": 2,
         "warmup_ratio": 0.2, "weight_decay": 0.01, "seed": 7}  # fmt: skip
ROWS = conversations(3)[:17]
RTOL = 1e-4


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _job(root: Path, model: Path, job_id: str, **changes: Any) -> Job:
    hyper = HYPER | changes.pop("hyper", {})
    return make_job(root, model, job_id=job_id, hyper=hyper, rows=ROWS, validation=conversations(), dtype="fp32",
                    **changes)  # fmt: skip


def _wait(executor: LocalExecutor, handle: Handle, job: Job, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while (code := executor.poll(handle)) is None:
        if time.monotonic() > deadline:
            executor.kill(handle)
            pytest.fail(f"the run did not end in {timeout:.0f} s: {_log(handle)}")
        time.sleep(0.2)
    return code


def _log(handle: Handle) -> str:
    return Path(handle["log_path"]).read_text(errors="replace")[-4000:]


def _run_parallel(job: Job) -> Handle:
    """Start the job as the worker does, through the local executor: torchrun with two ranks."""
    assert job.spec.processes == 2
    executor = LocalExecutor()
    handle = executor.start(job.spec, spec_path=str(job.path), env=_env())
    code = _wait(executor, handle, job)
    assert code == 0, _log(handle)
    return handle


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to a thousandth of the tensor's scale. Not element-wise relative: AdamW's step is about the learning rate
    for any gradient well above its eps, so an element whose gradient is near zero may move by a different amount
    when only the summation order changed."""
    return bool((a - b).abs().max() <= 1e-3 * b.abs().max())


def _training_procs(spec_path: Path) -> list[int]:
    """Live processes (not zombies) whose command line names this spec: torchrun and its ranks."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(spec_path) in cmdline and "tuneforge.train" in cmdline and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-parallel")


@pytest.fixture(scope="module")
def single(root, tiny_model) -> Job:
    job = _job(root, tiny_model, "ft-dp-one")
    assert run_in_process(job) == 0, job.result()
    return job


@pytest.fixture(scope="module")
def parallel(root, tiny_model) -> Job:
    job = _job(root, tiny_model, "ft-dp", processes=2)
    _run_parallel(job)
    return job


def test_two_processes_train_the_curve_of_one(single, parallel):
    curve = single.metric("train/loss")
    assert len(curve) == 6
    print(f"two processes vs one: train/loss max relative difference {_rel(curve, parallel.metric('train/loss')):.2e}, "
          f"eval/loss {_rel(single.metric('eval/loss'), parallel.metric('eval/loss')):.2e}")  # fmt: skip
    assert parallel.metric("train/loss") == pytest.approx(curve, rel=RTOL)
    assert parallel.metric("train/grad_norm") == pytest.approx(single.metric("train/grad_norm"), rel=RTOL)
    assert parallel.metric("train/token_accuracy") == pytest.approx(single.metric("train/token_accuracy"), abs=0.02)
    assert parallel.metric("train/lr") == pytest.approx(single.metric("train/lr"), rel=1e-9)
    assert len(parallel.metric("eval/loss")) == 2
    assert parallel.metric("eval/loss") == pytest.approx(single.metric("eval/loss"), rel=RTOL)
    one = load_file(single.local(final_prefix("ft-dp-one", "adapter")) / "adapter_model.safetensors")
    two = load_file(parallel.local(final_prefix("ft-dp", "adapter")) / "adapter_model.safetensors")
    assert all(_close(two[k], one[k]) for k in one)


def test_only_rank_0_writes_the_event_stream(single, parallel):
    records = parallel.records()
    assert [r["kind"] for r in records].count("result") == 1
    assert records[-1]["kind"] == "result" and records[-1]["status"] == "completed"
    train_steps = [r["step"] for r in records if r["kind"] == "metric" and "train/loss" in r["values"]]
    eval_steps = [r["step"] for r in records if r["kind"] == "metric" and "eval/loss" in r["values"]]
    assert train_steps == list(range(1, 7)) and eval_steps == [3, 6]
    assert [r["step"] for r in records if r["kind"] == "progress"] == list(range(1, 7))
    checkpoints = [(r["step"], r["checkpoint_kind"], r["adapter"]) for r in records if r["kind"] == "checkpoint"]
    assert checkpoints == [(r["step"], r["checkpoint_kind"], r["adapter"]) for r in single.records()
                           if r["kind"] == "checkpoint"]  # fmt: skip
    assert checkpoints[0] == (3, "intermediate", True)
    # the same events as one process, once each
    assert parallel.types() == single.types()
    start = next(e for e in parallel.events() if e["type"] == "training_start")
    assert start["data"]["processes"] == 2 and "2 data-parallel processes of 1 threads" in start["message"]
    assert next(e for e in single.events() if e["type"] == "training_start")["data"]["processes"] == 1


def test_a_checkpoint_resumes_at_one_and_at_two_processes(root, tiny_model, single, parallel):
    # What a checkpoint holds does not depend on the number of processes that wrote it.
    mine = parallel.local(checkpoint_prefix("ft-dp", 3)) / "resume"
    theirs = single.local(checkpoint_prefix("ft-dp-one", 3)) / "resume"
    state, other = (json.loads((folder / "state.json").read_text()) for folder in (mine, theirs))
    assert state.pop("early_stopping")["best"] == pytest.approx(other.pop("early_stopping")["best"], rel=RTOL)
    assert state == other
    opt, opt_other = (torch.load(folder / "optimizer.pt", weights_only=True) for folder in (mine, theirs))
    assert opt["param_groups"] == opt_other["param_groups"]
    for i, slot in opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert _close(slot[name], opt_other["state"][i][name])

    tail = single.metric("train/loss")[3:]
    at = Resume(key=checkpoint_prefix("ft-dp", 3), step=3)
    as_one = _job(root, tiny_model, "ft-dp", attempt=1, resume=at)
    assert run_in_process(as_one) == 0, as_one.result()
    as_two = _job(root, tiny_model, "ft-dp", attempt=2, resume=at, processes=2)
    _run_parallel(as_two)
    for resumed in (as_one, as_two):
        print(f"resumed as {resumed.spec.processes}: train/loss max relative difference "
              f"{_rel(tail, resumed.metric('train/loss')):.2e}")  # fmt: skip
        assert resumed.metric("train/loss") == pytest.approx(tail, rel=RTOL)
        assert resumed.metric("eval/loss") == pytest.approx(single.metric("eval/loss")[1:], rel=RTOL)
        assert [r["step"] for r in resumed.records() if r["kind"] == "progress"] == [4, 5, 6]
        assert [r["kind"] for r in resumed.records()].count("result") == 1
        assert resumed.result()["status"] == "completed"


def _start_until_training(executor: LocalExecutor, job: Job) -> Handle:
    handle = executor.start(job.spec, spec_path=str(job.path), env=_env())
    deadline = time.monotonic() + 120
    while not (Path(job.spec.events_path).is_file() and any(r["kind"] == "progress" for r in job.records())):
        assert time.monotonic() < deadline and executor.poll(handle) is None, _log(handle)
        time.sleep(0.2)
    assert len(_training_procs(job.path)) == 3  # torchrun and its two ranks
    return handle


def test_a_cancel_stops_every_rank_at_one_checkpointed_step_and_a_kill_takes_them_down(root, tiny_model):
    executor = LocalExecutor()
    long = {"n_epochs": 400, "batch_size": 2, "n_evals": 0}

    # cancel: SIGTERM to torchrun, which passes it on; the ranks agree on the step to stop at
    job = _job(root, tiny_model, "ft-dp-cancel", hyper=long, processes=2)
    handle = _start_until_training(executor, job)
    sent = time.monotonic()
    executor.cancel(handle)
    _wait(executor, handle, job, timeout=60)  # torchrun exits non-zero after a signal; the result line says why
    assert time.monotonic() - sent < 20  # within the worker's cancel grace (Settings.cancel_grace_s)
    records = job.records()
    assert [r["kind"] for r in records].count("result") == 1
    assert records[-1]["kind"] == "result" and records[-1]["status"] == "cancelled", _log(handle)
    last_step = [r for r in records if r["kind"] == "progress"][-1]["step"]
    [ckpt] = [r for r in records if r["kind"] == "checkpoint"]
    assert ckpt["step"] == last_step
    assert json.loads((job.local(ckpt["key"]) / "resume/state.json").read_text())["step"] == last_step
    assert _training_procs(job.path) == []

    # kill: SIGKILL to torchrun and its ranks (which torchrun starts in sessions of their own): none trains on
    job = _job(root, tiny_model, "ft-dp-kill", hyper=long, processes=2)
    handle = _start_until_training(executor, job)
    executor.kill(handle)
    _wait(executor, handle, job, timeout=30)
    deadline = time.monotonic() + 10
    while _training_procs(job.path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _training_procs(job.path) == []
    assert not [r for r in job.records() if r["kind"] == "result"]
