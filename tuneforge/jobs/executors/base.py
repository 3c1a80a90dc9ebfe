"""The Executor contract (jobs <-> compute): start, poll, cancel one TrainSpec run.

A run is described by a small JSON-able handle stored on the job row, so a restarted server can find
(and, if it still lives, adopt) a run it did not start itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from tuneforge.train.spec import TrainSpec

Handle = dict[str, Any]


class Executor(Protocol):
    name: str

    def start(self, spec: TrainSpec, *, spec_path: str, env: dict[str, str]) -> Handle:
        """Start the run; its events go to `spec.events_path`."""
        ...

    def poll(self, handle: Handle) -> int | None:
        """The exit code once the run has ended, None while it runs."""
        ...

    def cancel(self, handle: Handle) -> None:
        """Ask the run to stop (it checkpoints and writes a `cancelled` result)."""
        ...

    def kill(self, handle: Handle) -> None:
        """Stop the run at once."""
        ...
