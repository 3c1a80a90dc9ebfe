"""`TUNEFORGE_SERVE_BACKEND=vllm`: a model server is vLLM's OpenAI server, run as a process of its own environment
(vLLM pins its own torch), with runtime LoRA loading on.

vLLM needs the model as a local Hugging Face folder, and making one (converting a GGUF, downloading from the hub or
the blob store) takes torch and may take minutes, so neither the API process nor the pool's lock does it. The pool
starts tuneforge's own launcher instead, which replaces itself with vLLM once the folder is there:

    <tuneforge's python> -m tuneforge.serve --prepare-only --source JSON --cache-dir <home>/models
        --storage-url URL --exec-model-at N --exec-unset NAMES -- <vLLM's command line, less the folder>

The launcher resolves the folder (`catalog.loading.resolve_model_dir`, as training and the transformers backend
do), prints it, drops NAMES from its environment (tuneforge's PYTHONPATH and virtualenv, the hub token only the
download needed) and `exec`s vLLM with the folder inserted after the first N words: the same process id, log file
and start timeout for the pool, whose `/health` wait covers preparation and vLLM's start alike. vLLM's command line:

    <vllm_command words> <folder> --host 127.0.0.1 --port P --served-model-name <source.name> --enable-lora
        --max-loras N --max-lora-rank R --max-cpu-loras M [--dtype float32|bfloat16]
        [--tensor-parallel-size G] <vllm_extra_args words>

A replica placed on G > 1 GPUs (the hardware its endpoint chose) shards the model over them: tensor_parallel_size G.

`vllm_command` is therefore a command the model folder may follow: `vllm serve` (vLLM's CLI takes the model as
its first positional argument) or `/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import msgspec

from tuneforge.catalog.source import ModelSource
from tuneforge.settings import Settings, vllm_environment

# What the launcher leaves out of vLLM's environment: tuneforge's own Python setup (vLLM has its own packages) and
# the hub token (the folder is local by then).
NOT_FOR_VLLM = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# tuneforge's dtype names, as vLLM's --dtype says them ("auto" passes no flag: vLLM picks from the model's config).
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def vllm_argv(
    settings: Settings, source: ModelSource, port: int, folder: str | Path, *, tensor_parallel: int = 1
) -> list[str]:
    """vLLM's own command line for serving `folder` as `source.name` on `serve_bind_host`:`port`, sharded over
    `tensor_parallel` GPUs."""
    argv = [
        *shlex.split(settings.vllm_command), str(folder),
        "--host", settings.serve_bind_host,
        "--port", str(port),
        "--served-model-name", source.name,
        "--enable-lora",
        "--max-loras", str(settings.vllm_max_loras),
        "--max-lora-rank", str(settings.vllm_max_lora_rank),
        "--max-cpu-loras", str(settings.vllm_max_cpu_loras),
    ]  # fmt: skip
    if settings.serve_dtype in _DTYPES:
        argv += ["--dtype", _DTYPES[settings.serve_dtype]]
    if tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    return argv + shlex.split(settings.vllm_extra_args)


def vllm_command(
    settings: Settings, source: ModelSource, port: int, *, tensor_parallel: int = 1
) -> tuple[list[str], dict[str, str]]:
    """The pool's command line (tuneforge's launcher, which becomes vLLM) and its explicit environment."""
    words = shlex.split(settings.vllm_command)
    if not words:
        raise ValueError("TUNEFORGE_VLLM_COMMAND is empty: it names the command that starts vLLM, e.g. 'vllm serve'")
    full = vllm_argv(settings, source, port, "", tensor_parallel=tensor_parallel)
    command = [
        sys.executable, "-m", "tuneforge.serve", "--prepare-only",
        "--source", msgspec.json.encode(source).decode(),
        "--cache-dir", str(settings.home / "models"),
        "--storage-url", settings.storage_url,
        "--exec-model-at", str(len(words)),
        "--exec-unset", ",".join(NOT_FOR_VLLM),
        "--", *full[: len(words)], *full[len(words) + 1 :],
    ]  # fmt: skip
    return command, vllm_environment(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
