"""W&B logging's failure handling, against a scripted stand-in for the wandb module: wandb missing, a run that cannot
start, logging that breaks mid-run and a finish that times out each cost exactly one warning event (with the key
blanked out) and never an exception; wandb is imported only by a run that asks for W&B. Real logging, through the real
client, is tested in tests/integration/train/test_wandb_logging.py."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tuneforge.train import wandb_log
from tuneforge.train.events import Event, EventWriter, read_events
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, WandbConfig, standalone_plan

KEY = "tfsecret-unit-0123456789abcdef0123456789abcdef"


def _spec(tmp_path: Path, wandb: WandbConfig | None = WandbConfig(project="p")) -> TrainSpec:
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper(learning_rate=3e-4),
                           wandb=wandb)  # fmt: skip
    return TrainSpec(job_id="ft-unit", plan=plan, storage_url=str(tmp_path / "blobs"),
                     cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                     events_path=str(tmp_path / "events.jsonl"),
                     training_file_key="files/t", output_prefix="jobs/ft-unit", output_name="me/out")  # fmt: skip


def _events(out: EventWriter, spec: TrainSpec) -> list[dict[str, Any]]:
    out.close()
    return [msgspec.to_builtins(r) for r in read_events(spec.events_path, 0)[0] if isinstance(r, Event)]


class FakeRun:
    def __init__(self, *, fail_log_at: int | None = None, finish_error: BaseException | None = None) -> None:
        self.url = "https://wandb.example/team/p/runs/ft-unit"
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = 0
        self.fail_log_at = fail_log_at
        self.finish_error = finish_error

    def log(self, values: dict[str, float], step: int) -> None:
        if step == self.fail_log_at:
            raise BrokenPipeError(f"the wandb service went away (key {KEY})")
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished += 1
        if self.finish_error is not None:
            raise self.finish_error


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, run: FakeRun | None = None, init_error: Exception | None = None):
    calls: dict[str, Any] = {}
    module = types.ModuleType("wandb")

    def init(**kwargs: Any) -> FakeRun:
        calls["init"] = kwargs
        if init_error is not None:
            raise init_error
        assert run is not None
        return run

    module.init = init  # type: ignore[attr-defined]
    module.Settings = lambda **kw: calls.setdefault("settings", kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


@pytest.fixture(autouse=True)
def _job_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run here belongs to a job that gave its W&B key (the worker puts it in the run's environment)."""
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_a_job_without_a_key_is_told_to_give_one_and_wandb_is_not_started(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    calls = _fake_wandb(monkeypatch, run=FakeRun())
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 10) is None
    [event] = _events(out, spec)
    assert event["type"] == "warning" and "no W&B key" in event["message"] and "wandb_api_key" in event["message"]
    assert "init" not in calls


def test_an_offline_server_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = _fake_wandb(monkeypatch, run=FakeRun())
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 10) is not None
    assert calls["init"]["id"] == "ft-unit"


def test_no_wandb_config_means_no_run_and_no_event(tmp_path):
    spec = _spec(tmp_path, wandb=None)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 10) is None
    assert _events(out, spec) == []


def test_wandb_not_installed_is_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 10) is None
    [event] = _events(out, spec)
    assert event["type"] == "warning" and event["level"] == "warning"
    assert "wandb is not installed" in event["message"] and "still recorded with the job" in event["message"]


def test_a_run_that_cannot_start_is_one_warning_without_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    _fake_wandb(monkeypatch, init_error=RuntimeError(f"401 Unauthorized for key {KEY}\nmore detail"))
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 10) is None
    [event] = _events(out, spec)
    assert event["type"] == "warning"
    assert "could not start (RuntimeError: 401 Unauthorized for key ***)" in event["message"], event
    assert KEY not in event["message"] and "more detail" not in event["message"]


def test_start_passes_the_job_and_server_friendly_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_CONSOLE", "wrap")  # the server's own setting wins over the default
    run = FakeRun()
    calls = _fake_wandb(monkeypatch, run)
    spec = _spec(tmp_path, WandbConfig(project="p", entity="team", base_url="https://wandb.example"))
    out = EventWriter(spec.events_path)
    started = wandb_log.start(spec, out, 12)
    assert started is not None and started.url == run.url
    init = calls["init"]
    assert (init["project"], init["entity"], init["name"], init["id"]) == ("p", "team", "me/out", "ft-unit")
    assert init["resume"] == "allow" and init["dir"] == spec.work_dir
    assert init["config"]["learning_rate"] == 3e-4 and init["config"]["total_steps"] == 12
    assert init["config"]["base_model"] == "m"
    settings = calls["settings"]
    assert settings["base_url"] == "https://wandb.example" and "console" not in settings
    assert settings["save_code"] is False and settings["finish_timeout_raises"] is True
    [event] = _events(out, spec)
    assert event["type"] == "wandb_init" and event["data"] == {"wandb_url": run.url}


def test_logging_that_breaks_mid_run_is_one_warning_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    run = FakeRun(fail_log_at=2)
    _fake_wandb(monkeypatch, run)
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    started = wandb_log.start(spec, out, 4)
    assert started is not None
    for step in range(1, 5):
        started.log({"train/loss": 1.0 / step}, step=step)
    started.finish()
    assert run.logged == [({"train/loss": 1.0}, 1)]  # nothing after the failure
    assert run.finished == 0  # left to the process's exit hook, bounded by finish_timeout
    warnings = [e for e in _events(out, spec) if e["type"] == "warning"]
    assert len(warnings) == 1, warnings
    message = warnings[0]["message"]
    assert "failed at step 2 and stopped (BrokenPipeError: the wandb service went away (key ***))" in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [(TimeoutError("Timed out finishing run."), "did not take the run's last data in time"),
     (RuntimeError("boom"), "could not finish the run (RuntimeError: boom)")],
)  # fmt: skip
def test_a_finish_that_fails_is_one_warning(tmp_path, monkeypatch, error, expected):
    run = FakeRun(finish_error=error)
    _fake_wandb(monkeypatch, run)
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    started = wandb_log.start(spec, out, 1)
    assert started is not None
    started.log({"train/loss": 0.5}, step=1)
    started.finish()
    started.finish()  # a second call does nothing
    assert run.finished == 1
    warnings = [e["message"] for e in _events(out, spec) if e["type"] == "warning"]
    assert len(warnings) == 1 and expected in warnings[0], warnings


def test_wandb_is_imported_only_by_a_run_that_asks_for_it():
    code = (
        "import sys, tuneforge.train.__main__, tuneforge.train.wandb_log, tuneforge.jobs.worker, tuneforge.api.app; "
        "assert 'wandb' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_server_with_wandb_disabled_says_so_once(tmp_path, monkeypatch):
    run = FakeRun()
    run.disabled = True  # what wandb.init returns under WANDB_MODE=disabled
    _fake_wandb(monkeypatch, run)
    spec = _spec(tmp_path)
    out = EventWriter(spec.events_path)
    assert wandb_log.start(spec, out, 1) is None
    [event] = _events(out, spec)
    assert event["type"] == "warning" and "W&B is disabled on this server" in event["message"]
