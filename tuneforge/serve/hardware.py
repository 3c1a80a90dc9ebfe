"""What this host can run a model server on: its CPU, and its GPUs by type and count (torch-free: the API lists it).

Hardware ids follow the hosted service's scheme, so the same `--hardware` values read alike:
- GPUs: `{count}x_{vendor}_{model}_{memory}gb[_{link}]`, e.g. `1x_nvidia_h100_80gb_sxm`, `2x_nvidia_a100_80gb_sxm`,
  `1x_nvidia_l40s_45gb`. `model` is the GPU's name without its vendor, memory and link words, lower case, words
  joined by `_` (`NVIDIA GeForce RTX 4090` -> `geforce_rtx_4090`); `memory` is the size in the name where the name
  has one (`A100-SXM4-80GB` -> 80), else the reported memory in GiB, rounded; `link` is `sxm`, `pcie` or `nvl` where
  the name says so (an `HBM` part, an H200 or a B200 is SXM), and left out where it cannot be told. N identical GPUs
  are offered as `1x_…` up to `Nx_…`; each type of a mixed host has its own ids.
- The CPU: `cpu`, one option (its cores and memory change with the container's limits; the id does not).

`probe()` asks the machine once per process (GPUs do not change while it runs); `probe(nvidia_smi=TEXT)` reads the
given `nvidia-smi` output instead and caches nothing (for tests). A host without `nvidia-smi`, or whose `nvidia-smi`
fails or hangs (5 s), has no GPUs.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

CPU_ID = "cpu"
# The availability zones endpoints can run in: this host is one, "local".
ZONES = ("local",)
MIB = 1 << 20
GIB = 1 << 30
_NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
_SMI_TIMEOUT_S = 5.0
_SXM_ONLY = {"h200", "b200", "b100", "gb200"}  # sold without a PCIe part unless the name says NVL / PCIe


@dataclass(frozen=True)
class HardwareOption:
    """One way to run a replica on this host.

    `gpu_memory_bytes` is one GPU's memory (0 for the CPU); `memory_bytes` is what a replica on this option can use
    (the host's memory for the CPU, `gpu_count * gpu_memory_bytes` for GPUs)."""

    id: str
    gpu_type: str  # "cpu", or `{model}-{memory}gb` as the hosted service writes it (the CLI shows it less "-80gb")
    gpu_link: str  # "sxm", "pcie", "nvl" or "" (unknown, and for the CPU)
    gpu_count: int
    gpu_memory_bytes: int
    memory_bytes: int
    cores: int
    gpu_memory_gb: float  # the size in the id (a GPU's, as sold), or the host's memory in GiB for the CPU
    updated_at: float = field(default_factory=time.time)  # when it was probed (Unix seconds)
    devices: str = ""  # the GPUs a replica on it sees (CUDA_VISIBLE_DEVICES: indices in nvidia-smi's order; "" = none)

    def fits(self, needed_bytes: int) -> bool:
        """Whether a model server that needs `needed_bytes` fits in this option's memory."""
        return needed_bytes <= self.memory_bytes


def fits(option: HardwareOption, needed_bytes: int) -> bool:
    return option.fits(needed_bytes)


# --- GPUs ---------------------------------------------------------------------------------------------------------

_NOISE = re.compile(r"^(nvidia|tesla)$", re.I)
_MEMORY_WORD = re.compile(r"^(\d+)gb$", re.I)
_LINK_WORD = re.compile(r"^(sxm\d*|pcie|nvl|hbm\d*e?)$", re.I)


def _slug(words: list[str]) -> str:
    return "_".join(re.sub(r"[^a-z0-9]+", "", w.lower()) for w in words if re.sub(r"[^a-z0-9]+", "", w.lower()))


def describe_gpu(name: str, memory_mib: int) -> tuple[str, int, str]:
    """(`model`, `memory` in GB as sold, `link`) of a GPU as `nvidia-smi` names it."""
    words = [w for w in re.split(r"[\s\-_/]+", name.strip()) if w]
    model_words, memory, link = [], 0, ""
    for word in words:
        if _NOISE.match(word):
            continue
        if m := _MEMORY_WORD.match(word):
            memory = int(m[1])
        elif _LINK_WORD.match(word):
            low = word.lower()
            link = (link or "sxm") if low.startswith(("sxm", "hbm")) else low
        else:
            model_words.append(word)
    model = _slug(model_words) or "gpu"
    if not link and model in _SXM_ONLY:
        link = "sxm"
    return model, memory or round(memory_mib / 1024), link


def gpu_id(count: int, model: str, memory_gb: int, link: str, vendor: str = "nvidia") -> str:
    return f"{count}x_{vendor}_{model}_{memory_gb}gb" + (f"_{link}" if link else "")


def parse_nvidia_smi(text: str, *, cores: int | None = None) -> list[HardwareOption]:
    """The GPU options of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` output: per GPU
    type (in the order first seen), `1x` up to the number of such GPUs. Lines that do not parse are skipped."""
    groups: OrderedDict[tuple[str, int, str], list[int]] = OrderedDict()
    indices: dict[tuple[str, int, str], list[int]] = {}
    for index, line in enumerate(text.splitlines()):
        name, _, mem = line.rpartition(",")
        try:
            memory_mib = int(float(mem.strip()))
        except ValueError:
            continue
        if not name.strip() or memory_mib <= 0:
            continue
        kind = describe_gpu(name, memory_mib)
        groups.setdefault(kind, []).append(memory_mib)
        indices.setdefault(kind, []).append(index)
    cores = _cores() if cores is None else cores
    now = time.time()
    options = []
    for (model, memory_gb, link), mems in groups.items():
        per_gpu = min(mems) * MIB
        for count in range(1, len(mems) + 1):
            options.append(HardwareOption(
                id=gpu_id(count, model, memory_gb, link), gpu_type=f"{model.replace('_', '-')}-{memory_gb}gb",
                gpu_link=link, gpu_count=count, gpu_memory_bytes=per_gpu, memory_bytes=count * per_gpu, cores=cores,
                gpu_memory_gb=float(memory_gb), updated_at=now,
                devices=",".join(str(i) for i in indices[(model, memory_gb, link)][:count]),
            ))  # fmt: skip
    return options


def run_nvidia_smi() -> str:
    """`nvidia-smi`'s GPU list, or "" where there is none or it fails."""
    if shutil.which(_NVIDIA_SMI[0]) is None:
        return ""
    try:
        proc = subprocess.run(_NVIDIA_SMI, capture_output=True, text=True, timeout=_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


# --- the CPU ------------------------------------------------------------------------------------------------------


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def host_memory_bytes(meminfo: str | None = None, cgroup_limits: tuple[str, ...] | None = None) -> int:
    """The host's memory (`MemTotal`, else `MemAvailable`), or the container's cgroup limit where that is lower."""
    meminfo = _read("/proc/meminfo") if meminfo is None else meminfo
    values = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * 1024  # kB
    total = values.get("MemTotal") or values.get("MemAvailable") or 0
    if cgroup_limits is None:
        cgroup_limits = (_read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
    for raw in cgroup_limits:
        raw = raw.strip()
        if raw.isdigit() and 0 < int(raw) < (total or 1 << 62):  # "max" (v2) or a huge number (v1): no limit
            total = int(raw)
    return total


def cpu_option(*, cores: int | None = None, memory_bytes: int | None = None) -> HardwareOption:
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    return HardwareOption(
        id=CPU_ID, gpu_type="cpu", gpu_link="", gpu_count=0, gpu_memory_bytes=0, memory_bytes=memory,
        cores=_cores() if cores is None else cores, gpu_memory_gb=round(memory / GIB, 1),
    )  # fmt: skip


# --- the probe ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _probed() -> tuple[HardwareOption, ...]:
    return (cpu_option(), *parse_nvidia_smi(run_nvidia_smi()))


def probe(*, nvidia_smi: str | None = None) -> list[HardwareOption]:
    """This host's options: the CPU first, then the GPUs. Probed once per process; with `nvidia_smi` (that command's
    output), read from it instead, uncached."""
    if nvidia_smi is not None:
        return [cpu_option(), *parse_nvidia_smi(nvidia_smi)]
    return list(_probed())


def find(option_id: str, options: list[HardwareOption] | None = None) -> HardwareOption | None:
    """The option with this id (of `options`, or of this host), or None."""
    return next((o for o in (probe() if options is None else options) if o.id == option_id), None)
