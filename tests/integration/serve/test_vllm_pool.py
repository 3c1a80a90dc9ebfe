"""The serverless pool with `serve_backend=vllm`, against the vLLM stand-in (`tests/vllm_standin.py`): the pool's
process is tuneforge's launcher, which prepares the model folder and then becomes vLLM (same pid, same log), with
vLLM's command line and an environment holding runtime LoRA loading and none of tuneforge's Python setup."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tuneforge.catalog.source import ModelSource
from tuneforge.serve.backends.vllm import vllm_argv
from tuneforge.serve.pool import ModelServerPool, PoolError
from tuneforge.settings import Settings

pytestmark = pytest.mark.timeout(60)

STANDIN = Path(__file__).resolve().parents[2] / "vllm_standin.py"


@pytest.fixture
def model(tmp_path: Path) -> ModelSource:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return ModelSource(name="tiny/model", source_kind="local", source=str(folder))


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.json"
    monkeypatch.setenv("VLLM_STANDIN_RECORD", str(path))
    monkeypatch.setenv("HF_TOKEN", "hf-secret-token")
    return path


def _settings(tmp_path: Path, **fields: object) -> Settings:
    return Settings(home=tmp_path / "home", serve_backend="vllm", vllm_command=f"{sys.executable} {STANDIN}",
                    serve_start_timeout_s=30, **fields)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture
def pool_factory() -> Iterator[list[ModelServerPool]]:
    pools: list[ModelServerPool] = []
    yield pools
    for pool in pools:
        pool.shutdown()


def test_the_launcher_becomes_vllm_with_its_flags_and_environment(
    tmp_path: Path, model: ModelSource, record: Path, pool_factory: list[ModelServerPool]
) -> None:
    settings = _settings(tmp_path, serve_max_loras=3, vllm_extra_args="--enforce-eager")
    pool = ModelServerPool(settings)
    pool_factory.append(pool)
    with pool.using(model) as server:
        seen = json.loads(record.read_text())
        assert seen["pid"] == server.proc.pid  # exec'd: the pool's process is vLLM itself
        assert seen["argv"][1:] == vllm_argv(settings, model, server.port, model.source)[2:]
        assert seen["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert not {"PYTHONPATH", "VIRTUAL_ENV", "HF_TOKEN"} & set(seen["env_keys"])
        models = httpx.get(f"{server.url}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["tiny/model"] and models["data"][0]["root"] == model.source
        assert "starting: " in server.log_path.read_text()
    proc = server.proc
    pool.shutdown()
    assert proc.poll() is not None


def test_a_flag_vllm_would_refuse_fails_the_start_with_its_message(
    tmp_path: Path, model: ModelSource, record: Path, pool_factory: list[ModelServerPool]
) -> None:
    pool = ModelServerPool(_settings(tmp_path, vllm_extra_args="--no-such-flag 1"))
    pool_factory.append(pool)
    with pytest.raises(PoolError, match="unrecognized arguments: --no-such-flag") as info:
        pool.acquire(model)
    assert info.value.status_code == 500


def test_a_vllm_command_that_is_not_there_says_so(
    tmp_path: Path, model: ModelSource, pool_factory: list[ModelServerPool]
) -> None:
    settings = Settings(home=tmp_path / "home", serve_backend="vllm", vllm_command="/nonexistent/vllm serve",
                        serve_start_timeout_s=30)  # fmt: skip
    pool = ModelServerPool(settings)
    pool_factory.append(pool)
    with pytest.raises(PoolError, match="cannot start '/nonexistent/vllm'"):
        pool.acquire(model)


def test_prepare_only_prints_the_folder_last(tmp_path: Path, model: ModelSource) -> None:
    import msgspec

    out = subprocess.run(
        [sys.executable, "-m", "tuneforge.serve", "--prepare-only", "--source", msgspec.json.encode(model).decode(),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.splitlines()[-1] == model.source
