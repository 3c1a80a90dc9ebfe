"""The `local` executor: each run is a child process `python -m tuneforge.train SPEC` on this machine.

The child gets its own session, so it survives a server restart and can be adopted again by pid (by a server
on the same host: the handle names the host); its stdout and stderr go to a log file next to the spec.

A data-parallel run (`spec.processes` > 1) is `python -m torch.distributed.run --standalone --nproc-per-node N -m
tuneforge.train SPEC` instead: torchrun is the child (the pid in the handle), its ranks its own children, all
writing to the same log. Its command line still names `tuneforge.train` and the spec, so `_alive` knows it. A cancel's
SIGTERM goes to torchrun, which passes it on to every rank (the ranks checkpoint and report `cancelled`); a kill's
SIGKILL also goes to the ranks, which torchrun starts in sessions of their own (and which ask to die with torchrun
too, `train/distributed.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

from tuneforge.jobs.executors.base import Handle
from tuneforge.train.spec import TrainSpec


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, spec: TrainSpec, *, spec_path: str, env: dict[str, str]) -> Handle:
        log_path = os.path.join(os.path.dirname(spec_path), f"train-{spec.attempt}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command(spec, spec_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        return {"executor": self.name, "host": socket.gethostname(), "pid": proc.pid, "log_path": log_path,
                "spec_path": spec_path}  # fmt: skip

    def poll(self, handle: Handle) -> int | None:
        pid = int(handle["pid"])
        proc = self._children.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is not None:
                self._children.pop(pid, None)
            return code
        # A run adopted after a restart is not our child: watch its pid instead. A run on another host is out of
        # sight: it counts as gone (its job resumes from its checkpoint).
        if handle.get("host", socket.gethostname()) != socket.gethostname():
            return -1
        return None if _alive(pid, handle.get("spec_path")) else -1

    def cancel(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGKILL)

    def _signal(self, handle: Handle, sig: int) -> None:
        pid = int(handle["pid"])
        local = handle.get("host", socket.gethostname()) == socket.gethostname()
        if pid in self._children or (local and _alive(pid, handle.get("spec_path"))):
            # SIGKILL: the ranks of a torchrun first (found by their parent, which they lose once it is gone)
            ranks = _ranks(pid, handle.get("spec_path")) if sig == signal.SIGKILL else []
            for target in [*ranks, pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, sig)


def command(spec: TrainSpec, spec_path: str) -> list[str]:
    """The run's command line: one training process, or torchrun starting `spec.processes` of them on this machine
    (`--standalone`: a rendezvous of its own on a free local port, so runs side by side never meet)."""
    if spec.processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(spec.processes), "-m", "tuneforge.train", spec_path]  # fmt: skip
    return [sys.executable, "-m", "tuneforge.train", spec_path]


def _alive(pid: int, spec_path: str | None) -> bool:
    """True when `pid` still runs and is our training process (pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        return False
    return "tuneforge.train" in cmdline and (spec_path is None or spec_path in cmdline)


def _ranks(pid: int, spec_path: str | None) -> list[int]:
    """The training processes whose parent is `pid` (a torchrun's ranks; none for a single-process run)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and _alive(int(entry), spec_path):
            found.append(int(entry))
    return found
