"""The `fake` executor: plays a scripted run (events, metrics, checkpoints, a result) in a thread.

For tests of the queue and the worker without training. `steps` steps of `step_s` seconds each; a
cancel ends the run with a `cancelled` result; `fail_at` ends it with an error at that step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tuneforge.jobs.executors.base import Handle
from tuneforge.train.events import EventWriter
from tuneforge.train.spec import TrainSpec


class FakeExecutor:
    name = "fake"

    def __init__(self, *, steps: int = 5, step_s: float = 0.01, fail_at: int | None = None) -> None:
        self.steps = steps
        self.step_s = step_s
        self.fail_at = fail_at
        self.started: list[TrainSpec] = []
        self._runs: dict[int, dict[str, Any]] = {}
        self._next = 1

    def start(self, spec: TrainSpec, *, spec_path: str, env: dict[str, str]) -> Handle:
        run_id = self._next
        self._next += 1
        state: dict[str, Any] = {"cancel": threading.Event(), "code": None}
        thread = threading.Thread(target=self._play, args=(spec, state), daemon=True)
        state["thread"] = thread
        self._runs[run_id] = state
        self.started.append(spec)
        thread.start()
        return {"executor": self.name, "run": run_id}

    def _play(self, spec: TrainSpec, state: dict[str, Any]) -> None:
        out = EventWriter(spec.events_path)
        first = spec.resume.step + 1 if spec.resume else 1
        out.event("training_start", f"Training started at step {first} of {self.steps}", total_steps=self.steps)
        for step in range(first, self.steps + 1):
            if state["cancel"].wait(self.step_s):
                out.result("cancelled", "Cancelled by the user")
                state["code"] = 0
                return
            if self.fail_at == step:
                out.result("error", f"scripted failure at step {step}")
                state["code"] = 1
                return
            out.metric(step, **{"train/loss": 1.0 / step, "train/lr": 1e-4})
            out.progress(step, self.steps, epoch=1.0)
            if step == self.steps // 2:
                out.checkpoint(step, f"{spec.output_prefix}/checkpoints/step-{step:06d}")
        out.event("model_uploading", "Uploading the final weights")
        out.checkpoint(self.steps, f"{spec.output_prefix}/final/adapter", kind="final")
        out.result("completed", "Training completed")
        out.close()
        state["code"] = 0

    def poll(self, handle: Handle) -> int | None:
        state = self._runs.get(int(handle.get("run", 0)))
        if state is None:
            return -1  # not ours: a run of a previous server
        code: int | None = state["code"]
        return code

    def cancel(self, handle: Handle) -> None:
        state = self._runs.get(int(handle.get("run", 0)))
        if state is not None:
            state["cancel"].set()

    def kill(self, handle: Handle) -> None:
        self.cancel(handle)

    def wait_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        for state in self._runs.values():
            state["thread"].join(max(0.0, deadline - time.monotonic()))
