"""Where the serving engine's torch work may run: the step thread, and threads that end (`off_thread`), never a
server's main thread.

GNU OpenMP (torch's CPU runtime, which the fused kernels share) keeps one pool of worker threads per thread that
has run a parallel region, for as long as that thread lives. When the pools' threads outnumber the CPUs, libgomp
cuts its workers' spin-wait from ~300000 to 100 iterations, so each parallel region after the first has to wake
its workers from a futex sleep. Measured on a 2-core CPU (torch 2.13): once the main thread had run one parallel
op, an RMS-norm kernel call on another thread took 64 us instead of 8.6, and a decoding step of SmolLM2 at 32 rows
~1.5x as long, for the life of the process; a thread that has ended leaves no pool behind. So the engine's own
tensor work outside its step thread (loading the model, packing weights, adapter loads) runs through `off_thread`,
and callers should do their heavy torch work the same way (the bench does).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")


def off_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that ends with it, and return its result (or raise its error)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="tuneforge-engine-aside")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return cast(T, box["result"])


def off_main_thread(fn: Callable[[], T]) -> T:
    """`fn()` where it is called, unless that is the main thread: then through `off_thread`."""
    if threading.current_thread() is threading.main_thread():
        return off_thread(fn)
    return fn()
