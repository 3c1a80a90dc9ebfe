"""Endpoint replicas are pinned to their hardware: the GPU indices of an option (in nvidia-smi's order, per GPU
type) become the replica's CUDA_VISIBLE_DEVICES, "" for the CPU, and tuneforge's engine runs on cuda for GPUs."""

from __future__ import annotations

from pathlib import Path

from tuneforge.catalog.source import ModelSource
from tuneforge.serve import hardware
from tuneforge.serve.backends import launch_command
from tuneforge.settings import Settings

SOURCE = ModelSource(name="org/model", source_kind="local", source="/models/m")
# two H100s with an L4 between them: each type's options use its own indices
SMI = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA L4, 23034\nNVIDIA H100 80GB HBM3, 81559\n"


def test_gpu_options_carry_the_indices_of_their_type() -> None:
    options = {o.id: o for o in hardware.probe(nvidia_smi=SMI)}
    assert options["cpu"].devices == ""
    h100 = sorted((o for o in options.values() if o.gpu_type.startswith("h100")), key=lambda o: o.gpu_count)
    assert [(o.gpu_count, o.devices) for o in h100] == [(1, "0"), (2, "0,2")]
    (l4,) = [o for o in options.values() if o.gpu_type.startswith("l4")]
    assert l4.devices == "1"


def test_a_replica_sees_only_its_devices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(home=tmp_path)
    argv, env = launch_command(settings, SOURCE, 8000, devices="")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "--device" not in argv  # the CPU: no GPU visible
    argv, env = launch_command(settings, SOURCE, 8000, devices="0,2")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2" and argv[argv.index("--device") + 1] == "cuda"
    argv, env = launch_command(Settings(home=tmp_path, serve_backend="vllm"), SOURCE, 8000, devices="1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and "--device" not in argv  # vLLM places itself on what it sees
    assert "--tensor-parallel-size" not in argv  # one GPU: no sharding
    argv, env = launch_command(settings, SOURCE, 8000)  # serverless: not pinned, on the CPU
    assert "CUDA_VISIBLE_DEVICES" not in env and "--device" not in argv


def test_a_vllm_replica_on_several_gpus_shards_the_model_over_them(tmp_path: Path) -> None:
    vllm = Settings(home=tmp_path, serve_backend="vllm")
    argv, env = launch_command(vllm, SOURCE, 8000, devices="0,2")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    argv, _ = launch_command(vllm, SOURCE, 8000, devices="0,1,2,3")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    argv, _ = launch_command(vllm, SOURCE, 8000)  # serverless: whatever vLLM sees, unsharded
    assert "--tensor-parallel-size" not in argv
