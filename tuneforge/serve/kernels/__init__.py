"""Fused CPU kernels for the serving engine's decoding step (`decode.cpp`), built once per machine with its C++
compiler and loaded with ctypes.

Why: at 32 rows of SmolLM2-135M in bf16 on a 2-core CPU, a decoding step took 81 ms, of which the matmuls (at the
machine's 32-row bound) were 32 ms. The rest was attention (`scaled_dot_product_attention` on a query of one token
per row: ~500 us per layer, reading ~3 MB of cache at ~6 GB/s) and some 1,500 small torch operations (RMS norms of
seven operations, rotary embedding, residual adds, the cache writes), each a dispatch of 5-15 us on a [32, 576]
tensor. These kernels do each of those in one call: RMS norm with the residual add before it, rotary embedding
with the cache write, decode attention reading the strided cache in place (the rows x key/value heads spread over
torch's own OpenMP threads: the library links the `libgomp.so.1` torch has loaded), and SiLU-and-multiply. Two
more serve the rest of a step: each row's own adapter's low-rank term gathered by slot (`lora_rows`: a mixed batch
costs what one adapter does, where the stacked matmuls of `serve/lora.py` cost every slot's), and a greedy step's
token and log-probability in one pass over the raw logits (`argmax_logsumexp`). The matmuls stay torch's (oneDNN /
AMX), as does everything else the model does.

Numerics: each kernel rounds to the storage dtype where the torch operations it replaces round (bf16: round to
nearest even) and computes in fp32 in between, so the results equal transformers' up to the order of fp32 sums
(attention's softmax and weighted sum differ most: fp32 throughout, where SDPA rounds its probabilities).
`tests/integration/serve/test_serve_kernels.py` checks each kernel against its torch operations and the engine's
answers against transformers' forward.

Build: `g++ -O3 -march=native -fopenmp` into `<cache>/tuneforge/kernels/decode-<hash>.so`, the hash over the source,
the compiler's version and the CPU's flags (a library built for one CPU is never loaded on another). Where there is
no compiler or the build fails, `load()` returns None (logged once) and the engine keeps torch's operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES: dict[str, list[Any]] = {
    "rms_norm": [_P, _I, _P, _I, _P, _P, _I, _I, _I, ctypes.c_float, ctypes.c_int],
    "rotary_append": [_P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_int],
    "attend": [_P, _P, _P, _I, _I, _P, _I, _P, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int],
    "silu_mul": [_P, _I, _P, _I, _P, _I, _I, ctypes.c_int],
    "argmax_logsumexp": [_P, _I, _I, _I, _P, _P, _P, ctypes.c_int],
    "lora_rows": [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int],
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneforge" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def build(folder: Path | None = None) -> Path:
    """The kernels' shared library for this machine: built once (atomically: a half-written file is never
    loaded), then reused. Raises RuntimeError when there is no compiler or the build fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, _cpu_flags(), platform.machine()]).encode()
    ).hexdigest()[:16]
    folder = folder or cache_dir()
    target = folder / f"decode-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = Path(tmp) / target.name
        flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
        done = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    return target


def _rows_of(t: torch.Tensor, dtype: torch.dtype, rows: int, cols: int) -> bool:
    """t is a [rows, cols] CPU tensor of dtype whose rows may be strided but whose columns are contiguous."""
    return t.dtype == dtype and t.device.type == "cpu" and t.shape == (rows, cols) and t.stride(1) == 1


def _dense(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return t.dtype == dtype and t.device.type == "cpu" and tuple(t.shape) == shape and t.is_contiguous()


class DecodeKernels:
    """The kernels of one dtype (float32 or bfloat16). Each call checks the dtype, device, shapes and strides of
    its tensors (ValueError), so that no caller can make a kernel read or write outside them; the checks cost
    ~1 us a call."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype) -> None:
        suffix = _SUFFIX[dtype]
        self.dtype = dtype
        self.threads = torch.get_num_threads()
        fns: dict[str, Any] = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(library, f"tf_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
            fns[name] = fn
        self._rms_norm = fns["rms_norm"]
        self._rotary_append = fns["rotary_append"]
        self._attend = fns["attend"]
        self._silu_mul = fns["silu_mul"]
        self._argmax_logsumexp = fns["argmax_logsumexp"]
        self._lora_rows = fns["lora_rows"]

    def rms_norm(self, x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                 eps: float) -> None:  # fmt: skip
        """x += add (in place, when given); out = weight * x / rms(x), row by row ([rows, n])."""
        rows, n = x.shape
        dt = self.dtype
        if not (_rows_of(x, dt, rows, n) and _rows_of(out, dt, rows, n) and _dense(weight, dt, (n,))
                and (add is None or _rows_of(add, dt, rows, n))):  # fmt: skip
            raise ValueError("rms_norm: x, add, out [rows, n] and weight [n] of the kernels' dtype")
        self._rms_norm(
            x.data_ptr(), x.stride(0), None if add is None else add.data_ptr(), 0 if add is None else add.stride(0),
            weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0], x.shape[1], eps, self.threads,
        )  # fmt: skip

    def rotary_append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_out: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, col: int, heads: int,
                      kv_heads: int) -> None:  # fmt: skip
        """Rotary embedding of q [rows, heads * d] into q_out [rows, heads, d] and of k into column `col` of kbuf
        [rows, kv_heads, capacity, d]; v copied into column `col` of vbuf. cos / sin: [rows, d] contiguous."""
        rows, dt = q.shape[0], self.dtype
        d = kbuf.shape[3]
        shape = (rows, kv_heads, kbuf.shape[2], d)
        if not (_rows_of(q, dt, rows, heads * d) and _rows_of(k, dt, rows, kv_heads * d)
                and _rows_of(v, dt, rows, kv_heads * d) and _dense(cos, dt, (rows, d)) and _dense(sin, dt, (rows, d))
                and _dense(q_out, dt, (rows, heads, d)) and _dense(kbuf, dt, shape) and _dense(vbuf, dt, shape)
                and 0 <= col < shape[2] and d % 2 == 0):  # fmt: skip
            raise ValueError("rotary_append: shapes, dtype or column out of range")
        self._rotary_append(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(),
            sin.data_ptr(), q_out.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), kbuf.stride(0), kbuf.stride(1), col,
            q.shape[0], heads, kv_heads, kbuf.shape[3], self.threads,
        )  # fmt: skip

    def attend(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, start: torch.Tensor, end: int,
               out: torch.Tensor, heads: int, kv_heads: int, scale: float) -> None:  # fmt: skip
        """Row r's query q[r] [heads, d] against columns [start[r], end) of its cache; out [rows, heads * d]."""
        rows, dt = q.shape[0], self.dtype
        d = kbuf.shape[3]
        shape = (rows, kv_heads, kbuf.shape[2], d)
        if not (_dense(q, dt, (rows, heads, d)) and _dense(kbuf, dt, shape) and _dense(vbuf, dt, shape)
                and _dense(start, torch.long, (rows,)) and _dense(out, dt, (rows, heads * d))
                and 0 < end <= shape[2] and heads % kv_heads == 0):  # fmt: skip
            raise ValueError("attend: shapes, dtype or columns out of range")
        self._attend(
            q.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), kbuf.stride(0), kbuf.stride(1), start.data_ptr(), end,
            out.data_ptr(), q.shape[0], heads, kv_heads, kbuf.shape[3], scale, self.threads,
        )  # fmt: skip

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
        """out = silu(gate) * up ([rows, n]; gate and up may be column views of one tensor)."""
        rows, n = out.shape
        dt = self.dtype
        if not (_rows_of(gate, dt, rows, n) and _rows_of(up, dt, rows, n) and _dense(out, dt, (rows, n))):
            raise ValueError("silu_mul: gate, up [rows, n] and out [rows, n] contiguous, of the kernels' dtype")
        self._silu_mul(
            gate.data_ptr(),
            gate.stride(0),
            up.data_ptr(),
            up.stride(0),
            out.data_ptr(),
            out.shape[0],
            out.shape[1],
            self.threads,
        )

    def argmax_logsumexp(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of logits [rows, n]: the first index of the maximum (int64), the maximum and the logsumexp
        (float32), in one call over the raw logits (no fp32 copy of them)."""
        rows, n = logits.shape
        if not _rows_of(logits, self.dtype, rows, n) or n == 0:
            raise ValueError("argmax_logsumexp: logits [rows, n] of the kernels' dtype")
        index = torch.empty(rows, dtype=torch.long)
        maximum = torch.empty(rows, dtype=torch.float32)
        lse = torch.empty(rows, dtype=torch.float32)
        self._argmax_logsumexp(
            logits.data_ptr(), logits.stride(0), rows, logits.shape[1], index.data_ptr(), maximum.data_ptr(),
            lse.data_ptr(), self.threads,
        )  # fmt: skip
        return index, maximum, lse

    def lora_rows(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
                  rank: int) -> None:  # fmt: skip
        """y[i] += (x[i] A_s^T) B_s^T in place, s = slots[i] (int64, 0: none): x [rows, in], y [rows, out] (row
        strided views allowed), a [S * rank, in] and bt [S * rank, out] contiguous, slot-major. The slots must be
        below S (`lean._Projector` checks them once a forward)."""
        (rows, d_in), d_out, dt = x.shape, y.shape[1], self.dtype
        stacked = a.shape[0]
        if not (_rows_of(x, dt, rows, d_in) and _rows_of(y, dt, rows, d_out) and _dense(a, dt, (stacked, d_in))
                and _dense(bt, dt, (stacked, d_out)) and _dense(slots, torch.long, (rows,))
                and rank > 0 and stacked % rank == 0):  # fmt: skip
            raise ValueError("lora_rows: shapes or dtype")
        self._lora_rows(
            x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), a.data_ptr(), bt.data_ptr(), slots.data_ptr(),
            x.shape[0], rank, x.shape[1], y.shape[1], self.threads,
        )  # fmt: skip


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("serving kernels unavailable, decoding with torch operations: %s", exc)
        return None


def load(dtype: torch.dtype, device: torch.device) -> DecodeKernels | None:
    """The kernels for `dtype` on `device`, or None where they don't apply (not the CPU, another dtype, no build)."""
    if device.type != "cpu" or dtype not in _SUFFIX:
        return None
    library = _library()
    return None if library is None else DecodeKernels(library, dtype)
