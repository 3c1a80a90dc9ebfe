"""Settings: the only reader of environment variables.

Built once at process start (`Settings()` or `Settings(home=...)`) and passed down explicitly.
Every environment variable tuneforge reads is a field here, prefixed `TUNEFORGE_`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30
MIB = 1 << 20


# What a child process (a training run, a model preparation) inherits from the server: the names below and the
# prefixes after them. Anything else the server holds (its own keys, its database password) stays with it.
_CHILD_NAMES = frozenset({
    "PATH", "HOME", "USER", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "VIRTUAL_ENV",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "CUDA_VISIBLE_DEVICES",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})  # fmt: skip
_CHILD_PREFIXES = ("LC_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_",
                   "KMP_", "NVIDIA_", "CUDA_", "WANDB_")  # fmt: skip


def child_environment(**extra: str) -> dict[str, str]:
    """The explicit environment of a child process: the allowed part of this one, quiet defaults, then `extra`.

    OpenMP threads that spin while they wait collapse throughput when cores are shared (measured 10x and more),
    so children wait passively unless the operator says otherwise.
    """
    env = {k: v for k, v in os.environ.items() if k in _CHILD_NAMES or k.startswith(_CHILD_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.update(extra)
    return env


# A training run's compute dtype: auto (bf16 autocast where bf16 is fast, else fp32), or forced.
TrainDtype = Literal["auto", "fp32", "bf16"]


def default_home() -> Path:
    return Path.home() / ".tuneforge"


class Settings(BaseSettings):
    """Everything configurable about a tuneforge process."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="folder for the database, blobs and caches")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<home>/tuneforge.db")
    storage_url: str = Field("", description="fsspec URL of the blob root; default <home>/blobs")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = Field(
        "", description="base URL clients reach the server at (for upload URLs); default: the request's own"
    )
    upload_secret: str = Field("", description="HMAC key that signs upload URLs; default: random per home")
    upload_url_ttl_s: int = 24 * 3600
    stale_upload_s: int = 24 * 3600
    max_file_bytes: int = int(50.1 * GIB)
    multipart_threshold_bytes: int = 5 * GIB
    max_line_bytes: int = 150 * MIB
    max_report_errors: int = 20
    validation_workers: int = 1
    log_level: str = "info"
    price_per_token: float = Field(0.0, description="dollars charged per trained token (estimates and total_price)")
    duplicate_job_window_s: float = Field(
        30.0, description="an identical POST /fine-tunes from the same owner within this window returns the first job"
    )
    executor: str = Field("local", description="how training runs: local (a child process per job) or fake")
    run_worker: bool = Field(True, description="run the job worker inside the API server")
    prepare_models: bool = Field(
        True, description="a preview of a model no run has prepared yet converts or downloads it in the background"
    )
    train_slots: int = Field(1, description="how many training runs at once (one per device slot)")
    train_device: str = Field("cpu", description="device for training runs: cpu or cuda:N")
    train_threads: int | None = Field(None, description="torch threads per training run (default: all cores)")
    train_dtype: TrainDtype = Field(
        "auto", description="compute dtype of training runs: auto (bf16 autocast where bf16 is fast), fp32 or bf16"
    )
    max_attempts: int = Field(3, description="how often a job whose process died is resumed before it fails")
    cancel_grace_s: float = Field(20.0, description="seconds a cancelled run gets to checkpoint before SIGKILL")
    heartbeat_timeout_s: float = Field(600.0, description="a run silent this long is treated as dead")
    lease_s: float = Field(
        30.0,
        description="a worker that has not renewed its hold on a job for this long is presumed dead, and "
        "another worker takes the job over (adopting its live run, or resuming it from its checkpoint)",
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'tuneforge.db'}"
        if not self.storage_url:
            self.storage_url = str(self.home / "blobs")
        return self

    def ensure_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
