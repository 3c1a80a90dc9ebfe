"""How a model server process is started, per backend (`TUNEFORGE_SERVE_BACKEND`): `transformers` runs
`python -m tuneforge.serve` (the engine of `serve/engine.py`); `vllm` runs vLLM's OpenAI server (`vllm.py`); every
backend's process speaks the same OpenAI protocol (vLLM's), so the pool and the API's proxy do not depend on which
one runs."""

from __future__ import annotations

import sys

import msgspec

from tuneforge.catalog.source import ModelSource
from tuneforge.serve.backends.vllm import vllm_command
from tuneforge.settings import Settings, serving_environment


def transformers_command(settings: Settings, source: ModelSource, port: int) -> tuple[list[str], dict[str, str]]:
    command = [
        sys.executable, "-m", "tuneforge.serve",
        "--source", msgspec.json.encode(source).decode(),
        "--cache-dir", str(settings.home / "models"),
        "--host", settings.serve_bind_host,
        "--port", str(port),
        "--dtype", settings.serve_dtype,
        "--max-batch", str(settings.serve_max_batch),
        "--max-loras", str(settings.serve_max_loras),
        "--storage-url", settings.storage_url,
    ]  # fmt: skip
    if settings.serve_threads:
        command += ["--threads", str(settings.serve_threads)]
    return command, serving_environment()


def launch_command(
    settings: Settings, source: ModelSource, port: int, *, devices: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and the explicit environment of a model server for `source` on `port`; `devices`, when
    given, pins it to those GPUs (`CUDA_VISIBLE_DEVICES`; "" for none: the CPU)."""
    if settings.serve_backend == "transformers":
        command, env = transformers_command(settings, source, port)
        if devices:  # a replica on GPU hardware: tuneforge's engine on the GPUs it is given
            command += ["--device", "cuda"]
    elif settings.serve_backend == "vllm":
        gpus = len([d for d in (devices or "").split(",") if d.strip()])
        command, env = vllm_command(settings, source, port, tensor_parallel=max(1, gpus))
    else:
        raise ValueError(f"unknown serving backend {settings.serve_backend!r}")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return command, env
