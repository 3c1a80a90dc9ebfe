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
DEFAULT_WANDB_URL = "https://api.wandb.ai"


# What a child process (a training run, a model preparation) inherits from the server: the names below and the
# prefixes after them (AWS_: the object store's endpoint and credentials, where storage is on S3). Anything else the
# server holds (its own keys, its database password) stays with it.
_CHILD_NAMES = frozenset({
    "PATH", "HOME", "USER", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "VIRTUAL_ENV",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})  # fmt: skip
_CHILD_PREFIXES = ("LC_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_",
                   "KMP_", "NVIDIA_", "CUDA_", "NCCL_", "TRITON_", "WANDB_",
                   "AWS_")  # fmt: skip


# The server's own W&B credentials never reach a run by inheritance: a run gets the job's own key, or the server's
# only where the operator says so (`Settings.wandb_server_key`, see `run_wandb_key`).
_CHILD_WITHHELD = frozenset({"WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CREDENTIALS_FILE"})


def child_environment(**extra: str) -> dict[str, str]:
    """The explicit environment of a child process: the allowed part of this one, quiet defaults, then `extra`.

    OpenMP threads that spin while they wait collapse throughput when cores are shared (measured 10x and more),
    so children wait passively unless the operator says otherwise (a model server: `serving_environment`).
    """
    env = serving_environment(**extra)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # unless the operator or `extra` set one
    return env


def serving_environment(**extra: str) -> dict[str, str]:
    """A child's environment (`child_environment`) that leaves OpenMP's own wait policy (a short spin, then sleep)
    unless the operator set one: for a model server, whose decoding step runs ~150 parallel regions back to back,
    where waking sleeping threads for each costs more (SmolLM2 bf16 on 2 cores, 32 rows: 57 ms a step with the
    default, 81 ms passive)."""
    env = {k: v for k, v in os.environ.items()
           if (k in _CHILD_NAMES or k.startswith(_CHILD_PREFIXES)) and k not in _CHILD_WITHHELD}  # fmt: skip
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.update(extra)
    return env


# vLLM's own settings reach a vLLM model server (`vllm_environment`), except its API key: with one, vLLM would
# refuse the API's requests, which carry none.
_VLLM_WITHHELD = frozenset({"VLLM_API_KEY"})
# The values vLLM's `--max-lora-rank` accepts (its LoRAConfig.max_lora_rank Literal).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_environment(**extra: str) -> dict[str, str]:
    """The explicit environment of a vLLM model server: a child's (`child_environment`) without W&B's settings
    (a model server logs nothing there), plus the server's `VLLM_*` settings, then `extra`."""
    env = {k: v for k, v in child_environment().items() if not k.startswith("WANDB_")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_") and k not in _VLLM_WITHHELD})
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
    database_pool_size: int = Field(
        10, ge=1, le=1000,
        description="connections a server process keeps open to a server database (PostgreSQL): the pool's size; "
        "as many more may open under a burst and close after it",
    )  # fmt: skip
    storage_url: str = Field("", description="fsspec URL of the blob root; default <home>/blobs")
    host: str = "127.0.0.1"
    port: int = 8000
    hosted_catalog: bool = Field(
        True,
        description="list the hosted service's models by their names (catalog/hosted.py), downloaded from the "
        "hub on first use; 0: only the built-in and added models",
    )
    public_url: str = Field(
        "", description="base URL clients reach the server at (for upload URLs); default: the request's own"
    )
    upload_secret: str = Field("", description="HMAC key that signs upload URLs; default: random per home")
    secrets_key: str = Field(
        "", description="Fernet key that seals job secrets at rest; default: a key file made in the home folder (0600)"
    )
    upload_url_ttl_s: int = 24 * 3600
    direct_uploads: bool = Field(
        True,
        description="with storage on S3, the upload URLs are the bucket's own presigned PUTs (multipart for large "
        "files), so upload bytes never pass through the API server; 0: the server receives them itself",
    )
    stale_upload_s: float = Field(
        3600.0,
        gt=0,
        description="idle time after which an unfinished upload (opened, parts or bytes sent, never finished) is "
        "removed with its parts and temporary files; the server sweeps every min(idle/4, 60 s) while it runs, and an "
        "upload is active while a PUT of its bytes or a part is being received",
    )
    max_file_bytes: int = int(50.1 * GIB)
    max_pending_upload_bytes: int = Field(
        0,
        ge=0,
        description="most bytes one owner may hold in unfinished uploads: a multipart upload reserves its file_size "
        "at initiate, a single PUT counts its bytes as they arrive; over it is a 413 (0, the default: twice "
        "max_file_bytes)",
    )
    multipart_threshold_bytes: int = 5 * GIB
    max_body_bytes: int = Field(
        4 * MIB, description="largest request body outside the upload URLs (JSON, forms); a larger one gets 413"
    )
    max_line_bytes: int = 150 * MIB
    max_report_errors: int = 20
    validation_workers: int = 1
    log_level: str = "info"
    price_per_token: float = Field(0.0, description="dollars charged per trained token (estimates and total_price)")
    duplicate_job_window_s: float = Field(
        30.0, description="an identical POST /fine-tunes from the same owner within this window returns the first job"
    )
    executor: str = Field(
        "local",
        description="how training runs: local (a child process per job), ray (a Ray job per run, on the "
        "cluster at ray_address; model servers are placed by Ray too) or fake",
    )
    ray_address: str = Field("", description="the Ray cluster's dashboard address (http://HEAD:8265), for executor ray")
    run_worker: bool = Field(True, description="run the job worker inside the API server")
    prepare_models: bool = Field(
        True, description="a preview of a model no run has prepared yet converts or downloads it in the background"
    )
    serve_backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="model servers: transformers (in tuneforge's environment) or vllm (GPU hosts)"
    )
    serve_memory_bytes: int = Field(
        8 * GIB, description="memory all serverless model servers may use together; idle ones stop to make room"
    )
    serve_idle_s: float = Field(600.0, gt=0, description="a serverless model server idle this long is stopped")
    serve_start_timeout_s: float = Field(300.0, gt=0, description="how long a model server may take to start")
    serve_dtype: TrainDtype = Field(
        "auto", description="model servers' dtype: auto (bf16 where the machine runs it fast, else fp32), fp32, bf16"
    )
    serve_max_batch: int = Field(32, ge=1, description="requests one model server decodes together")
    serve_max_loras: int = Field(8, ge=1, description="LoRA adapters one model server keeps loaded (LRU)")
    serve_threads: int | None = Field(None, description="torch threads per model server (default: all cores)")
    serve_bind_host: str = Field(
        "127.0.0.1",
        description="address model servers listen on: loopback on one machine; 0.0.0.0 when Ray places them on "
        "several machines (the cluster's network must be private: a model server has no authentication of its own)",
    )
    endpoint_scale_up_load: float = Field(
        8.0,
        gt=0,
        description="a dedicated endpoint adds a replica (up to max_replicas) when its requests in flight "
        "per ready replica stay above this for endpoint_scale_up_after_s",
    )
    endpoint_scale_up_after_s: float = Field(5.0, ge=0, description="see endpoint_scale_up_load")
    endpoint_scale_down_idle_s: float = Field(
        120.0,
        gt=0,
        description="a dedicated endpoint above min_replicas whose replicas were all idle this long stops one",
    )
    vllm_command: str = Field(
        "vllm serve",
        description="serve_backend vllm: the command that starts vLLM's OpenAI server (split like a shell line), to "
        "which the model folder is appended as the next argument, then tuneforge's flags: `vllm serve` (the "
        "default, from PATH) or `/opt/vllm/bin/vllm serve`, or `/opt/vllm/bin/python -m "
        "vllm.entrypoints.openai.api_server --model` for another environment's python",
    )
    vllm_max_loras: int = Field(0, ge=0, description="vLLM's --max-loras: adapters in one batch (0: serve_max_loras)")
    vllm_max_lora_rank: int = Field(64, description=f"vLLM's --max-lora-rank, one of {VLLM_LORA_RANKS}; an adapter "
                                                    "of a higher rank is refused before it is loaded")  # fmt: skip
    vllm_max_cpu_loras: int = Field(
        0, ge=0, description="vLLM's --max-cpu-loras: adapters kept in host memory (0: vllm_max_loras)"
    )
    vllm_extra_args: str = Field(
        "", description="more vLLM flags, appended last (split like a shell line), e.g. --gpu-memory-utilization 0.5"
    )
    train_slots: int = Field(1, description="how many training runs at once (one per device slot)")
    train_device: str = Field("cpu", description="device for training runs: cpu or cuda:N")
    train_threads: int | None = Field(None, description="torch threads per training run (default: all cores)")
    train_processes: int = Field(
        1,
        ge=1,
        description="data-parallel processes per SFT run (executor local: started by torchrun; gloo on CPU, one GPU "
        "each from train_device on CUDA); the run's threads are shared among them; DPO and vision-language runs "
        "use one",
    )
    train_dtype: TrainDtype = Field(
        "auto", description="compute dtype of training runs: auto (bf16 autocast where bf16 is fast), fp32 or bf16"
    )
    max_attempts: int = Field(3, description="how often a job whose process died is resumed before it fails")
    cancel_grace_s: float = Field(20.0, description="seconds a cancelled run gets to checkpoint before SIGKILL")
    heartbeat_timeout_s: float = Field(600.0, description="a run silent this long is treated as dead")
    wandb_base_urls: list[str] = Field(
        default_factory=lambda: [DEFAULT_WANDB_URL],
        description="the W&B servers a job's wandb_base_url may name (a JSON list); any other is refused at create",
    )
    wandb_server_key: bool = Field(
        False,
        description="let a job without its own wandb_api_key log with this server's WANDB_API_KEY (only ever to the "
        "server's own W&B, never to a wandb_base_url the job names)",
    )
    lease_s: float = Field(
        30.0,
        description="a worker that has not renewed its hold on a job for this long is presumed dead, and "
        "another worker takes the job over (adopting its live run, or resuming it from its checkpoint)",
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = default_database_url(self.home)
        if not self.storage_url:
            self.storage_url = str(self.home / "blobs")
        if not self.max_pending_upload_bytes:
            self.max_pending_upload_bytes = 2 * self.max_file_bytes
        self.vllm_max_loras = self.vllm_max_loras or self.serve_max_loras
        self.vllm_max_cpu_loras = self.vllm_max_cpu_loras or self.vllm_max_loras
        if self.vllm_max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"vllm_max_lora_rank must be one of {VLLM_LORA_RANKS} (vLLM's ranks)")
        if self.vllm_max_cpu_loras < self.vllm_max_loras:
            raise ValueError(f"vllm_max_cpu_loras ({self.vllm_max_cpu_loras}) must be at least vllm_max_loras "
                             f"({self.vllm_max_loras}), as vLLM requires")  # fmt: skip
        return self

    def ensure_home(self) -> None:
        """The home folder, readable by its owner only (it holds the database, keys and job data)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)


def same_url(a: str, b: str) -> bool:
    """Whether two base URLs name the same server (scheme and host case-insensitive, a trailing slash ignored)."""
    from urllib.parse import urlsplit

    x, y = urlsplit(a.strip().rstrip("/")), urlsplit(b.strip().rstrip("/"))
    return (x.scheme.lower(), (x.hostname or "").lower(), x.port, x.path) == (
        y.scheme.lower(), (y.hostname or "").lower(), y.port, y.path
    )  # fmt: skip


def run_wandb_key(settings: Settings, *, job_key: str | None, job_base_url: str | None) -> str | None:
    """The W&B key a run gets: the job's own; else the server's, only where the operator allows it and the job does
    not send its data to a W&B server of its own choosing; else none (the run then says it has no key)."""
    if job_key:
        return job_key
    if settings.wandb_server_key and job_base_url is None:
        return os.environ.get("WANDB_API_KEY") or None
    return None


def default_database_url(home: Path) -> str:
    """The metadata database of a home without TUNEFORGE_DATABASE_URL: a SQLite file in it."""
    return f"sqlite:///{home / 'tuneforge.db'}"
