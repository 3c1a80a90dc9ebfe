"""What a child process inherits, and which W&B key a run gets: the server's own credentials never reach a run by
inheritance, and go to no W&B server a job chose."""

from __future__ import annotations

import pytest

from tuneforge.settings import Settings, child_environment, run_wandb_key, same_url, serving_environment

OPERATOR_KEY = "operator-wandb-key-0123456789abcdef0123456789"


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", OPERATOR_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.internal.example")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", "postgresql://tf:db-password@db/tf")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.internal.example")


@pytest.mark.usefixtures("operator_env")
def test_a_child_inherits_the_servers_settings_but_not_its_keys() -> None:
    env = child_environment(EXTRA="1")
    assert env["WANDB_BASE_URL"] == "https://wandb.internal.example" and env["WANDB_MODE"] == "offline"
    assert env["HF_ENDPOINT"] == "https://hub.internal.example" and env["EXTRA"] == "1"
    assert "WANDB_API_KEY" not in env and "TUNEFORGE_DATABASE_URL" not in env
    assert OPERATOR_KEY not in "".join(env.values()) and "db-password" not in "".join(env.values())


def test_children_wait_passively_except_model_servers(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert child_environment()["OMP_WAIT_POLICY"] == "PASSIVE"  # training and preparation processes
    assert "OMP_WAIT_POLICY" not in serving_environment()  # OpenMP's default: a short spin, then sleep
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's choice reaches every child
    assert child_environment()["OMP_WAIT_POLICY"] == serving_environment()["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.usefixtures("operator_env")
@pytest.mark.parametrize(
    ("server_key", "job_key", "job_url", "expected"),
    [
        (False, "job-key", None, "job-key"),
        (False, None, None, None),  # the operator did not allow it: a keyless job logs nowhere
        (True, None, None, OPERATOR_KEY),  # allowed, and the run logs to the server's own W&B
        (True, None, "https://api.wandb.ai", None),  # never to a W&B server the job names
        (True, "job-key", "https://api.wandb.ai", "job-key"),
    ],
)
def test_a_run_gets_the_jobs_key_and_the_servers_only_where_allowed(
    tmp_path, server_key: bool, job_key: str | None, job_url: str | None, expected: str | None
) -> None:
    settings = Settings(home=tmp_path, wandb_server_key=server_key)
    assert run_wandb_key(settings, job_key=job_key, job_base_url=job_url) == expected


def test_allowed_wandb_servers_are_compared_as_urls(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(home=tmp_path).wandb_base_urls == ["https://api.wandb.ai"]
    monkeypatch.setenv("TUNEFORGE_WANDB_BASE_URLS", '["https://wandb.internal.example", "http://127.0.0.1:8080"]')
    assert Settings(home=tmp_path).wandb_base_urls == ["https://wandb.internal.example", "http://127.0.0.1:8080"]
    assert same_url("https://API.wandb.ai/", "https://api.wandb.ai")
    assert not same_url("https://api.wandb.ai.evil.example", "https://api.wandb.ai")
    assert not same_url("http://api.wandb.ai", "https://api.wandb.ai")
    assert not same_url("https://api.wandb.ai:8443", "https://api.wandb.ai")
    assert not same_url("https://user@evil.example/@api.wandb.ai", "https://api.wandb.ai")


def test_unfinished_uploads_are_bounded_by_default(tmp_path) -> None:
    """An owner may hold twice the largest file in unfinished uploads (unless set), and an upload idle for an hour
    is swept."""
    settings = Settings(home=tmp_path)
    assert settings.max_pending_upload_bytes == 2 * settings.max_file_bytes
    assert settings.stale_upload_s == 3600
    assert Settings(home=tmp_path, max_file_bytes=1000).max_pending_upload_bytes == 2000
    assert Settings(home=tmp_path, max_file_bytes=1000, max_pending_upload_bytes=1500).max_pending_upload_bytes == 1500
