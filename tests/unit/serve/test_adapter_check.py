"""The adapter check run before every adapter load: LoRA factors pass; lm_head / embed_tokens weights, peft's
modules_to_save and a rank above the vLLM server's are refused with a message naming them; torch-free."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.serve.adapter_check import AdapterRefused, adapter_problems, check_adapter, tensor_names

LORA_NAMES = [
    f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj") for ab in "AB"
]


def write_safetensors(path: Path, names: list[str]) -> None:
    """A valid safetensors file whose tensors are 1-element float32s named `names`."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(names)))


def adapter(folder: Path, names: list[str] | None = None, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "adapter_model.safetensors", LORA_NAMES if names is None else names)
    return folder


def test_a_plain_lora_adapter_passes(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a")
    assert sorted(tensor_names(folder / "adapter_model.safetensors")) == sorted(LORA_NAMES)
    assert adapter_problems(folder, max_rank=64) == []
    check_adapter(folder)


def test_lm_head_weights_are_refused_by_name(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a", [*LORA_NAMES, "base_model.model.lm_head.weight"])
    with pytest.raises(AdapterRefused, match=r"lm_head weights \(base_model\.model\.lm_head\.weight\)"):
        check_adapter(folder)


def test_modules_to_save_and_embeddings_are_refused(tmp_path: Path) -> None:
    names = [*LORA_NAMES, "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"]
    folder = adapter(tmp_path / "a", names, modules_to_save=["lm_head", "embed_tokens"])
    problems = adapter_problems(folder)
    assert len(problems) == 3, problems
    assert "whole weights of lm_head, embed_tokens (adapter_config.json modules_to_save)" in problems[0]
    assert any("embed_tokens weights" in p for p in problems) and any("lm_head weights" in p for p in problems)


def test_lora_factors_on_the_embeddings_are_refused_too(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a", [*LORA_NAMES, "base_model.model.model.embed_tokens.lora_embedding_A"])
    assert "embed_tokens" in " ".join(adapter_problems(folder))


def test_a_module_merely_named_like_lm_head_is_not_confused(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a", [*LORA_NAMES, "base_model.model.model.layers.0.mlp.lm_headroom.lora_A.weight"])
    assert adapter_problems(folder) == []


def test_a_rank_above_the_servers_is_refused_only_where_a_limit_is_given(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a", r=8, rank_pattern={"q_proj": 128})
    assert adapter_problems(folder) == []
    (problem,) = adapter_problems(folder, max_rank=64)
    assert "LoRA rank 128" in problem and "TUNEFORGE_VLLM_MAX_LORA_RANK" in problem


def test_broken_folders_say_what_is_wrong(tmp_path: Path) -> None:
    assert adapter_problems(tmp_path) == ["it has no adapter_config.json"]
    folder = adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(AdapterRefused, match="not a safetensors file"):
        check_adapter(folder)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(AdapterRefused, match="not JSON"):
        check_adapter(folder)


def test_real_safetensors_files_are_read(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "adapter_model.safetensors"
    safetensors_numpy.save_file({"a.lm_head.weight": np.zeros((2, 3), np.float32), "b": np.ones(4)}, str(path))
    assert sorted(tensor_names(path)) == ["a.lm_head.weight", "b"]


def test_the_check_imports_no_torch() -> None:
    code = "import sys, tuneforge.serve.adapter_check; assert not {'torch', 'safetensors'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
