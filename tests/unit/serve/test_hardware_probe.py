"""The host's hardware options: ids from canned `nvidia-smi` output (0, 1, 8 GPUs, mixed types), the CPU's memory
from canned /proc/meminfo and cgroup limits, `fits`, `find`, and the process-wide probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.serve import hardware
from tuneforge.serve.hardware import GIB, MIB, cpu_option, describe_gpu, host_memory_bytes, parse_nvidia_smi

H100 = "NVIDIA H100 80GB HBM3, 81559\n"
EIGHT_H100 = H100 * 8
MIXED = "NVIDIA A100-SXM4-80GB, 81920\nNVIDIA L40S, 46068\nNVIDIA A100-SXM4-80GB, 81920\n"


def ids(text: str) -> list[str]:
    return [o.id for o in parse_nvidia_smi(text, cores=4)]


def test_no_gpus_no_options() -> None:
    assert parse_nvidia_smi("", cores=4) == []
    assert parse_nvidia_smi("No devices were found\n", cores=4) == []


def test_one_h100() -> None:
    [option] = parse_nvidia_smi(H100, cores=16)
    assert option.id == "1x_nvidia_h100_80gb_sxm"
    assert option.gpu_type == "h100-80gb" and option.gpu_link == "sxm" and option.gpu_count == 1
    assert option.gpu_memory_bytes == 81559 * MIB == option.memory_bytes
    assert option.gpu_memory_gb == 80.0 and option.cores == 16


def test_eight_identical_gpus_are_offered_one_to_eight() -> None:
    options = parse_nvidia_smi(EIGHT_H100, cores=4)
    assert [o.id for o in options] == [f"{n}x_nvidia_h100_80gb_sxm" for n in range(1, 9)]
    assert [o.memory_bytes for o in options] == [n * 81559 * MIB for n in range(1, 9)]


def test_mixed_types_each_get_their_own_ids() -> None:
    assert ids(MIXED) == ["1x_nvidia_a100_80gb_sxm", "2x_nvidia_a100_80gb_sxm", "1x_nvidia_l40s_45gb"]


@pytest.mark.parametrize(
    ("name", "mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, ("h100", 80, "sxm")),
        ("NVIDIA H100 PCIe", 81559, ("h100", 80, "pcie")),
        ("NVIDIA H100 NVL", 95830, ("h100", 94, "nvl")),
        ("NVIDIA H200", 143771, ("h200", 140, "sxm")),
        ("NVIDIA A100-PCIE-40GB", 40960, ("a100", 40, "pcie")),
        ("NVIDIA GeForce RTX 4090", 24564, ("geforce_rtx_4090", 24, "")),
        ("Tesla T4", 15360, ("t4", 15, "")),
    ],
)
def test_gpu_names(name: str, mib: int, expected: tuple[str, int, str]) -> None:
    assert describe_gpu(name, mib) == expected


def test_lines_that_do_not_parse_are_skipped() -> None:
    assert ids("garbage\n, 100\nNVIDIA H100 80GB HBM3, [N/A]\n" + H100) == ["1x_nvidia_h100_80gb_sxm"]


def test_host_memory_is_memtotal_or_a_lower_cgroup_limit() -> None:
    meminfo = "MemTotal:       16384000 kB\nMemAvailable:    8000000 kB\n"
    assert host_memory_bytes(meminfo, ("max\n", "")) == 16384000 * 1024
    assert host_memory_bytes(meminfo, (str(4 * GIB), "")) == 4 * GIB
    assert host_memory_bytes(meminfo, ("", str((1 << 63) - 4096))) == 16384000 * 1024  # cgroup v1 "no limit"
    assert host_memory_bytes(meminfo, (str(64 * GIB), "")) == 16384000 * 1024  # a limit above the host's


def test_cpu_option_and_fits() -> None:
    cpu = cpu_option(cores=8, memory_bytes=16 * GIB)
    assert cpu.id == "cpu" and cpu.gpu_type == "cpu" and cpu.gpu_count == 0 and cpu.gpu_link == ""
    assert cpu.gpu_memory_gb == 16.0 and cpu.cores == 8
    assert cpu.fits(16 * GIB) and hardware.fits(cpu, 1) and not cpu.fits(16 * GIB + 1)


def test_probe_puts_the_cpu_first_and_find_looks_up_ids() -> None:
    options = hardware.probe(nvidia_smi=EIGHT_H100)
    assert options[0].id == "cpu" and options[0].memory_bytes > 0 and options[0].cores >= 1
    assert hardware.find("4x_nvidia_h100_80gb_sxm", options) == options[4]
    assert hardware.find("9x_nvidia_h100_80gb_sxm", options) is None


def test_the_real_probe_runs_once_per_process() -> None:
    first = hardware.probe()
    assert first[0].id == "cpu"
    assert hardware.probe() == first and hardware.probe() is not first  # a copy of one cached result
    assert hardware.find("cpu") == first[0]


def test_a_failing_nvidia_smi_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hardware.run_nvidia_smi() == ""
    fake.write_text("#!/bin/sh\nprintf 'NVIDIA H100 80GB HBM3, 81559\\n'\n")
    assert parse_nvidia_smi(hardware.run_nvidia_smi(), cores=1)[0].id == "1x_nvidia_h100_80gb_sxm"
