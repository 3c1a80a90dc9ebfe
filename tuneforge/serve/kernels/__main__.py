"""`python -m tuneforge.serve.kernels`: build the serving kernels for this machine now (set-up does, so the first
model server does not wait for the compiler); prints where the library is, or why there is none (not an error: the
engine then keeps torch's operations)."""

from __future__ import annotations

import subprocess

from tuneforge.serve.kernels import build

if __name__ == "__main__":
    try:
        print(f"serving kernels: {build()}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"serving kernels not built ({exc}); model servers will use torch's operations")
