"""W&B logging for real: the recipe runs as the server runs it (`python -m tuneforge.train SPEC`, the key in its
environment) with the real wandb client, against a loopback stand-in for the W&B server (tests/wandb_standin.py)
that records what W&B would receive. The stub gets the job's key, a run named after the job whose history is the
job's metrics step by step and whose config holds the hyperparameters, and the job gets a `wandb_url`; the key is in
no file the run leaves (events, logs, wandb's run folder, the process's home) and in no request body. An outage of
W&B mid-run costs one warning and training completes; WANDB_MODE=offline (for servers without access to W&B) writes
a run that `wandb sync` uploads later, read back here through the stub."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from recipe_support import Job, conversations, make_job
from wandb_standin import StubRun, WandbStub

from tuneforge.storage.layout import final_prefix
from tuneforge.train.spec import WandbConfig

HYPER = {"n_epochs": 2, "batch_size": 4, "packing": False, "n_evals": 2, "n_checkpoints": 1}
TOTAL_STEPS = 4  # 8 examples (unpacked), 4 per batch, 2 epochs


def _key() -> str:
    """A fresh W&B-shaped key (wandb wants 40+ characters), unique so that finding it anywhere means a leak."""
    return "tfwb" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def _env(tmp_path: Path, key: str, **extra: str) -> dict[str, str]:
    """The run's environment as the worker builds it (WANDB_API_KEY from the job's secret), without the developer's
    own WANDB_* settings, and with a home of its own so that any file wandb writes there can be searched."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_API_KEY=key,
               WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
               WANDB_DATA_DIR=str(home / "wandb-data"))  # fmt: skip
    env.update(extra)
    return env


def _train(job: Job, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuneforge.train", str(job.path)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _job_metrics(job: Job) -> dict[int, dict[str, Any]]:
    """The job's metrics by step (a step's train and eval values together, as W&B keeps them in one row)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in job.records():
        if r["kind"] == "metric":
            by_step.setdefault(r["step"], {}).update(r["values"])
    return by_step


def _logged(run: StubRun) -> dict[int, dict[str, Any]]:
    """The history W&B received, by step, without W&B's own `_step` / `_runtime` / `_timestamp`."""
    rows: dict[int, dict[str, Any]] = {}
    for row in run.history:
        rows.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def _assert_key_nowhere(key: str, root: Path, *texts: str) -> None:
    needle = key.encode()
    leaks = [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaks, f"the W&B key is written in {leaks}"
    assert not [t for t in texts if key in t], "the W&B key is in the run's output"


def _wandb_warnings(job: Job) -> list[str]:
    return [e["message"] for e in job.events() if e["type"] == "warning" and "Weights & Biases" in e["message"]]


def test_a_run_logs_its_metrics_to_wandb(tmp_path, tiny_model):
    key = _key()
    with WandbStub() as stub:
        wandb = WandbConfig(project="tf-tests", name="tiny run", entity="team", base_url=stub.base_url)
        job = make_job(tmp_path, tiny_model, job_id="ft-wandb", hyper=HYPER, validation=conversations(), wandb=wandb)
        proc = _train(job, _env(tmp_path, key))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job.result()["status"] == "completed", job.result()
    assert _wandb_warnings(job) == []

    # The key reached W&B (and only it), for a run named after the job, in the project, entity and name asked for.
    assert stub.api_keys == {key}
    run = stub.run()
    assert (run.run_id, run.project, run.entity, run.display_name) == ("ft-wandb", "tf-tests", "team", "tiny run")
    types = job.types()
    assert types.index("wandb_init") < types.index("training_start"), types
    [init] = [e for e in job.events() if e["type"] == "wandb_init"]
    assert init["data"] == {"wandb_url": stub.run_url(run)}

    # What W&B holds is the job's metrics, step by step and value for value.
    expected = _job_metrics(job)
    assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))
    assert sum("eval/loss" in v for v in expected.values()) == 2
    assert _logged(run) == expected
    assert run.summary["train/loss"] == expected[TOTAL_STEPS]["train/loss"]
    assert run.complete and run.exitcode == 0

    hyper = msgspec.to_builtins(job.spec.hyper) | {"lora_alpha": job.spec.hyper.alpha}  # the value the run used
    assert {k: run.config.get(k) for k in hyper} == hyper and run.config["lora_alpha"] == 2 * job.spec.hyper.lora_r
    assert run.config["total_steps"] == TOTAL_STEPS and run.config["base_model"] == "tiny-llama"
    assert run.config["job_id"] == "ft-wandb" and run.config["method"] == "sft"

    # The run's local files are kept in the job's work folder; the key is in none of them, nor anywhere else.
    assert list((Path(job.spec.work_dir) / "wandb").glob("run-*-ft-wandb/run-ft-wandb.wandb"))
    assert not [b for b in stub.bodies if key.encode() in b]
    assert run.files and not [name for name, data in run.files.items() if key.encode() in data]
    _assert_key_nowhere(key, tmp_path, proc.stdout, proc.stderr)


def test_a_wandb_outage_mid_run_costs_one_warning(tmp_path, tiny_model):
    key = _key()
    with WandbStub(outage_once_run_exists=True) as stub:
        job = make_job(tmp_path, tiny_model, job_id="ft-outage", hyper=HYPER,
                       wandb=WandbConfig(project="p", base_url=stub.base_url))  # fmt: skip
        started = time.monotonic()
        proc = _train(job, _env(tmp_path, key, WANDB_FINISH_TIMEOUT="2"))
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job.result()["status"] == "completed", job.result()
    assert (job.local(final_prefix("ft-outage", "adapter")) / "manifest.json").is_file()
    assert stub.failed_requests > 0 and not stub.run().complete
    assert "wandb_init" in job.types()
    [warning] = _wandb_warnings(job)
    assert "did not take the run's last data in time" in warning and "still recorded with the job" in warning
    assert len(job.metric("train/loss")) == TOTAL_STEPS
    assert elapsed < 120, f"the outage held the run for {elapsed:.0f} s"
    _assert_key_nowhere(key, tmp_path, proc.stdout, proc.stderr)


def test_offline_mode_keeps_the_run_for_wandb_sync(tmp_path, tiny_model):
    """WANDB_MODE=offline in the server's environment: nothing is sent, the run is written in the job's work folder,
    and the job has no wandb_url. `wandb sync` (wandb's own reader of the run file) uploads exactly the metrics."""
    key = _key()
    job = make_job(tmp_path, tiny_model, job_id="ft-offline", hyper=HYPER, validation=conversations(),
                   wandb=WandbConfig(project="tf-offline", entity="team"))  # fmt: skip
    proc = _train(job, _env(tmp_path, key, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job.result()["status"] == "completed", job.result()
    assert _wandb_warnings(job) == []
    [init] = [e for e in job.events() if e["type"] == "wandb_init"]
    assert init["data"] == {"wandb_url": None} and "offline" in init["message"]
    [run_dir] = (Path(job.spec.work_dir) / "wandb").glob("offline-run-*-ft-offline")
    _assert_key_nowhere(key, tmp_path, proc.stdout, proc.stderr)

    with WandbStub() as stub:
        # (in tmp_path: `wandb sync` writes its own logs in ./wandb)
        sync = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", str(run_dir)], cwd=tmp_path,
                              env=_env(tmp_path, key, WANDB_BASE_URL=stub.base_url), capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert sync.returncode == 0, sync.stdout + sync.stderr
    run = stub.run()
    assert (run.run_id, run.project, run.entity) == ("ft-offline", "tf-offline", "team")
    assert _logged(run) == _job_metrics(job) and len(_logged(run)) == TOTAL_STEPS
    assert run.config["learning_rate"] == job.spec.hyper.learning_rate
    assert run.complete and run.exitcode == 0
