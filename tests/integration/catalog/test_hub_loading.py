"""Hub sources of the catalog, in process: `resolve_model_dir` against the loopback hub stand-in (tests/hub_standin.py).

huggingface_hub reads HF_ENDPOINT (and HF_HUB_OFFLINE, the token file...) into `huggingface_hub.constants` when it is
imported, so the `hub_env` fixture points those constants at the stand-in; HF_TOKEN is read at each request, so tests
set it with monkeypatch like the worker sets it for a training run.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_standin import HubStandin
from safetensors.torch import load_file

from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.catalog.source import ModelSource
from tuneforge.errors import NotFoundError, PermissionDeniedError, TuneForgeError
from tuneforge.train.tiny_models import save_tiny_model

PUBLIC, PRIVATE, GATED, SHARDED = "tiny-org/llama", "tiny-org/private-qwen3", "tiny-org/gated-llama", "tiny-org/sharded"
PRIVATE_TOKEN, GATED_TOKEN, OTHER_TOKEN = "hf_private_reader_0001", "hf_gated_granted_0002", "hf_someone_else_0003"
TINY_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders: llama (two seeds, for two revisions), qwen3, and a sharded llama with clutter around it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub-models")
    llama = save_tiny_model(root / "llama", "llama")
    assert {p.name for p in llama.iterdir()} == TINY_FILES
    sharded = root / "sharded"
    shutil.copytree(llama, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(sharded, max_shard_size="60KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    # What real repos carry besides the transformers files: a duplicate checkpoint in another format, originals and
    # other formats in sub-folders, pickled weights, an adapter config, a card.
    shutil.copy(sharded / shards[0], sharded / "consolidated.safetensors")
    (sharded / "original").mkdir()
    (sharded / "original" / "params.json").write_text("{}")
    (sharded / "onnx").mkdir()
    shutil.copy(sharded / shards[0], sharded / "onnx" / "model.safetensors")
    (sharded / "pytorch_model.bin").write_bytes(b"not a pickle")
    (sharded / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (sharded / "README.md").write_text("# sharded\n")
    (sharded / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    return {
        "llama": llama,
        "llama-v2": save_tiny_model(root / "llama-v2", "llama", seed=1),
        "qwen3": save_tiny_model(root / "qwen3", "qwen3"),
        "sharded": sharded,
    }


@pytest.fixture(scope="module")
def hub(folders: dict[str, Path]) -> Iterator[HubStandin]:
    standin = HubStandin(tree_page_size=4)  # small pages: the client must follow the Link header
    standin.add_repo(PUBLIC, folders["llama"])
    standin.add_repo(PUBLIC, folders["llama-v2"], revision="v2")
    standin.add_repo(PRIVATE, folders["qwen3"], private=True, token=PRIVATE_TOKEN)
    standin.add_repo(GATED, folders["llama"], gated=True, token=GATED_TOKEN)
    standin.add_repo(SHARDED, folders["sharded"])
    standin.issue_token(OTHER_TOKEN)
    with standin:
        yield standin


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub_env(hub: HubStandin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubStandin:
    """huggingface_hub pointed at the stand-in, online, with no token unless a test sets HF_TOKEN."""
    from huggingface_hub import constants

    point_hub_at(monkeypatch, hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/integration/train sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # as the worker sets it for training runs
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))  # a developer's login stays out
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-stored-tokens"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    hub.clear_log()
    return hub


def hub_source(repo: str, revision: str | None = None, name: str = "tiny/hub-model") -> ModelSource:
    return ModelSource(name=name, source_kind="hub", source=repo, revision=revision)


def dead_url() -> str:
    """An address nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def weights_fetched(hub: HubStandin) -> list[str]:
    return [r.path for r in hub.requests if r.method == "GET" and (r.listener == "cdn" or "/resolve/" in r.path)]


def test_public_repo_downloads_once_into_the_cache_and_loads(
    hub_env: HubStandin, folders: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "models"
    folder = resolve_model_dir(hub_source(PUBLIC), cache)

    assert folder.is_relative_to(cache / "hub") and folder.name == hub_env.repos[PUBLIC].branches["main"].sha
    assert {p.name for p in folder.iterdir()} == TINY_FILES
    assert sorted(hub_env.file_downloads(PUBLIC)) == sorted(TINY_FILES)  # each file once
    [cdn] = [r for r in hub_env.requests if r.listener == "cdn"]
    assert cdn.authorization is None  # weights come from the "CDN" origin
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")  # the chat template came along (chat_template.jinja)
    for name, tensor in load_file(folders["llama"] / "model.safetensors").items():
        assert torch.equal(model.state_dict()[name], tensor), name

    hub_env.clear_log()
    again = resolve_model_dir(hub_source(PUBLIC), cache)
    assert again == folder
    assert weights_fetched(hub_env) == [], "a second call fetched files again"
    # Only "which commit is main now?" (asked by the access check, then by snapshot_download): no listing, no file.
    assert {r.path for r in hub_env.requests} == {f"/api/models/{PUBLIC}", f"/api/models/{PUBLIC}/revision/main"}


def test_a_revision_is_fetched_as_its_own_snapshot(hub_env: HubStandin, tmp_path: Path) -> None:
    main = resolve_model_dir(hub_source(PUBLIC), tmp_path)
    v2 = resolve_model_dir(hub_source(PUBLIC, revision="v2"), tmp_path)
    assert v2.name == hub_env.repos[PUBLIC].branches["v2"].sha != main.name
    assert (v2 / "model.safetensors").read_bytes() != (main / "model.safetensors").read_bytes()
    assert any(r.path == f"/api/models/{PUBLIC}/revision/v2" for r in hub_env.requests)

    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(hub_source(PUBLIC, revision="no-such-branch"), tmp_path)
    message = caught.value.message
    assert "'no-such-branch'" in message and repr(PUBLIC) in message and "not found" in message, message


def test_sharded_repo_fetches_what_transformers_needs_and_nothing_else(hub_env: HubStandin, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(hub_source(SHARDED), tmp_path)
    shards = {name for name in hub_env.repos[SHARDED].branches["main"].files if name.startswith("model-")}
    expected = (TINY_FILES - {"model.safetensors"}) | {"model.safetensors.index.json"} | shards
    assert {p.name for p in folder.iterdir()} == expected
    cdn = [r for r in hub_env.requests if r.listener == "cdn"]
    assert len(cdn) == len(shards)  # not consolidated.safetensors, onnx/model.safetensors or pytorch_model.bin
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_unknown_repo_is_a_clear_not_found(hub_env: HubStandin, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(hub_source("tiny-org/does-not-exist", name="tiny/gone"), tmp_path)
    message = caught.value.message
    assert "'tiny-org/does-not-exist'" in message and "'tiny/gone'" in message, message
    assert "was not found on the hub at " + hub_env.url in message, message
    assert "hf_api_token" in message and "\n" not in message, message
    assert [(r.path, r.status) for r in hub_env.requests] == [("/api/models/tiny-org/does-not-exist", 404)]


def test_private_repo_needs_the_token_and_the_hub_decides_every_time(
    hub_env: HubStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = hub_source(PRIVATE)
    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(source, tmp_path)
    assert repr(PRIVATE) in caught.value.message and "if it is private" in caught.value.message
    assert [(r.status, r.authorization) for r in hub_env.requests] == [(401, None)]

    monkeypatch.setenv("HF_TOKEN", PRIVATE_TOKEN)  # what the worker does with a job's hf_api_token
    hub_env.clear_log()
    folder = resolve_model_dir(source, tmp_path)
    assert {p.name for p in folder.iterdir()} == TINY_FILES
    hub_requests = [r for r in hub_env.requests if r.listener == "hub"]
    assert hub_requests and all(r.authorization == f"Bearer {PRIVATE_TOKEN}" for r in hub_requests)
    assert all(r.authorization is None for r in hub_env.requests if r.listener == "cdn")

    # Cached now; still, a run whose token cannot read the repo does not get it from the cache.
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(source, tmp_path)
    assert "or the access token sent (hf_api_token) cannot read it" in caught.value.message
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NotFoundError):
        resolve_model_dir(source, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_never_issued")
    with pytest.raises(PermissionDeniedError) as caught:
        resolve_model_dir(source, tmp_path)
    assert "rejected the access token sent (hf_api_token) as invalid credentials" in caught.value.message


def test_gated_repo_needs_a_granted_token(hub_env: HubStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = hub_source(GATED)
    with pytest.raises(PermissionDeniedError) as caught:
        resolve_model_dir(source, tmp_path)
    assert repr(GATED) in caught.value.message and "is gated" in caught.value.message
    assert "pass an access token of that account as hf_api_token" in caught.value.message

    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    assert {p.name for p in resolve_model_dir(source, tmp_path).iterdir()} == TINY_FILES

    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)  # cached, but this account was not granted access
    with pytest.raises(PermissionDeniedError) as caught:
        resolve_model_dir(source, tmp_path)
    assert "has not been granted access" in caught.value.message


def test_an_unreachable_hub_falls_back_to_the_cache(
    hub_env: HubStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    folder = resolve_model_dir(hub_source(PUBLIC), tmp_path / "cache")
    point_hub_at(monkeypatch, dead_url())
    assert resolve_model_dir(hub_source(PUBLIC), tmp_path / "cache") == folder
    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(hub_source(PUBLIC), tmp_path / "empty-cache")
    message = caught.value.message
    assert "could not reach the hub at http://127.0.0.1:" in message and "not in the model cache" in message, message
    assert repr(PUBLIC) in message, message

    point_hub_at(monkeypatch, hub_env.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_env.clear_log()
    assert resolve_model_dir(hub_source(PUBLIC), tmp_path / "cache") == folder
    with pytest.raises(NotFoundError) as caught:
        resolve_model_dir(hub_source(PUBLIC, revision="v2"), tmp_path / "cache")
    assert "HF_HUB_OFFLINE is set" in caught.value.message
    assert hub_env.requests == []


def test_a_repo_without_safetensors_weights_is_refused(hub_env: HubStandin, tmp_path: Path) -> None:
    hub_env.add_repo("tiny-org/pickled", _folder_with_bin(tmp_path / "pickled", hub_env))
    with pytest.raises(TuneForgeError) as caught:
        resolve_model_dir(hub_source("tiny-org/pickled"), tmp_path / "cache")
    assert "has no safetensors weights (model.safetensors missing)" in caught.value.message


def _folder_with_bin(folder: Path, hub: HubStandin) -> Path:
    folder.mkdir()
    for name, f in hub.repos[PUBLIC].branches["main"].files.items():
        (folder / (name if name != "model.safetensors" else "pytorch_model.bin")).write_bytes(f.data)
    return folder
