"""The vLLM backend's command line and environment (`serve/backends/vllm.py`): tuneforge's launcher, which becomes
`vllm serve FOLDER --host 127.0.0.1 --port P --served-model-name NAME --enable-lora ...` in an environment with
runtime LoRA loading on and none of the server's secrets."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneforge.catalog.source import ModelSource
from tuneforge.serve.backends import launch_command
from tuneforge.serve.backends.vllm import NOT_FOR_VLLM, vllm_argv
from tuneforge.settings import Settings

SOURCE = ModelSource(name="org/model-1", source_kind="local", source="/models/m1")


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def test_the_pool_starts_the_launcher_which_becomes_vllm_serve(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, serve_backend="vllm", serve_max_loras=4)
    argv, _ = launch_command(settings, SOURCE, 8123)
    launcher, vllm = _split(argv)
    assert launcher[:4] == [sys.executable, "-m", "tuneforge.serve", "--prepare-only"]
    opts = dict(zip(launcher[4::2], launcher[5::2], strict=True))
    assert opts["--cache-dir"] == str(tmp_path / "models") and opts["--storage-url"] == settings.storage_url
    assert opts["--exec-model-at"] == "2" and opts["--exec-unset"].split(",") == list(NOT_FOR_VLLM)
    assert '"name":"org/model-1"' in opts["--source"]
    # The launcher inserts the folder after the first 2 words: exactly vLLM's own command line.
    assert [*vllm[:2], "/models/m1", *vllm[2:]] == vllm_argv(settings, SOURCE, 8123, "/models/m1") == [
        "vllm", "serve", "/models/m1", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "org/model-1",
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "4",
    ]  # fmt: skip


def test_another_pythons_vllm_takes_the_folder_after_model(tmp_path: Path) -> None:
    command = "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model"
    settings = Settings(home=tmp_path, serve_backend="vllm", vllm_command=command, vllm_max_loras=2,
                        vllm_max_cpu_loras=16, vllm_max_lora_rank=128, serve_dtype="bf16",
                        vllm_extra_args="--gpu-memory-utilization 0.5 --max-model-len '4096'")  # fmt: skip
    argv, _ = launch_command(settings, SOURCE, 9000)
    launcher, _vllm = _split(argv)
    assert launcher[launcher.index("--exec-model-at") + 1] == "4"
    full = vllm_argv(settings, SOURCE, 9000, "/models/m1")
    assert full[:5] == [*shlex.split(command), "/models/m1"]
    assert full[full.index("--max-loras") + 1] == "2" and full[full.index("--max-cpu-loras") + 1] == "16"
    assert full[full.index("--max-lora-rank") + 1] == "128" and full[full.index("--dtype") + 1] == "bfloat16"
    assert full[-4:] == ["--gpu-memory-utilization", "0.5", "--max-model-len", "4096"]


def test_the_environment_allows_runtime_loras_and_holds_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", "together-secret")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.internal.example")
    monkeypatch.setenv("TUNEFORGE_SECRETS_KEY", "fernet-secret")
    monkeypatch.setenv("VLLM_API_KEY", "vllm-secret")
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "FLASH_ATTN")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/nvidia/lib64")
    _, env = launch_command(Settings(home=tmp_path, serve_backend="vllm"), SOURCE, 8000)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"
    assert not [k for k in env if k.startswith(("TOGETHER_", "WANDB_", "TUNEFORGE_")) or k == "VLLM_API_KEY"]
    assert "secret" not in "".join(env.values())


def test_the_transformers_backend_is_unchanged(tmp_path: Path) -> None:
    argv, env = launch_command(Settings(home=tmp_path), SOURCE, 8000)
    assert argv[1:3] == ["-m", "tuneforge.serve"] and "--prepare-only" not in argv
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vllm_max_lora_rank": 48}, "vllm_max_lora_rank must be one of"),
        ({"vllm_max_loras": 8, "vllm_max_cpu_loras": 4}, "must be at least vllm_max_loras"),
    ],
)
def test_settings_vllm_would_refuse_are_refused_at_start(tmp_path: Path, fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(home=tmp_path, **fields)  # type: ignore[arg-type]


def test_defaults_follow_serve_max_loras(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, serve_max_loras=3)
    assert (s.vllm_max_loras, s.vllm_max_cpu_loras, s.vllm_max_lora_rank, s.vllm_command) == (3, 3, 64, "vllm serve")
